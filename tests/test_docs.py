"""Docs that are generated from code must match it."""

import os

from transforms.example_proto import feature_spec_markdown
from transforms.schema import Sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_feature_spec_matches_schema():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert feature_spec_markdown(Sample).strip() in readme, (
        "README's TFRecord feature table is stale: paste transforms.example_proto.feature_spec_markdown(Sample)"
    )


def test_readme_first_screen_has_the_two_commands():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()[:30]
    commands = [line for line in lines if line.startswith((".venv/bin/", "python3 -m venv"))]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e . && .venv/bin/python -m pipelines.demo",
        ".venv/bin/python -m pytest -v tests",
    ]
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert ".venv/bin/python -m pytest -v tests" in ci
