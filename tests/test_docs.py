"""Docs that are generated from code must match it."""

import glob
import os
import re

from transforms.formats.tf_example import feature_spec_markdown
from transforms.schema import Sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_formats_page_feature_spec_matches_schema():
    page = open(os.path.join(ROOT, "docs", "formats.md"), encoding="utf-8").read()
    assert feature_spec_markdown(Sample).strip() in page, (
        "docs/formats.md's TFRecord feature table is stale: paste transforms.formats.tf_example.feature_spec_markdown(Sample)"
    )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    anchors, fenced = set(), False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6} ", line):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_every_link_in_readme_and_docs_resolves():
    pages = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "ARCHITECTURE.md"), os.path.join(ROOT, "SECURITY.md"),
             *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    assert len(pages) > 10
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", open(page, encoding="utf-8").read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_one_screen_and_docs_hold_the_rest():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines: move detail to docs/"
    for page in ("demo", "build_entity_index", "select_candidates", "decontaminate", "refine", "ground", "training",
                 "formats", "outputs", "plan", "dataflow", "reliability", "testing"):
        assert os.path.exists(os.path.join(ROOT, "docs", f"{page}.md")), page


def test_readme_first_screen_has_the_two_commands():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()[:30]
    commands = [line for line in lines if line.startswith((".venv/bin/", "python3 -m venv"))]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e . && .venv/bin/python -m pipelines.demo",
        '.venv/bin/python -m pytest -v -m "not slow" tests',
    ]
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    # CI runs the README's command (the fast tier), then the slow tier.
    assert '.venv/bin/python -m pytest -v -m "not slow" tests' in ci
    assert ".venv/bin/python -m pytest -v -m slow tests" in ci
