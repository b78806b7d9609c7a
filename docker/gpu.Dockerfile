# GPU workers for Dataflow: the Beam SDK image, CUDA PyTorch, open_clip, sentence-transformers,
# faiss and this package. For decontaminate (CLIP ViT-L/14 on images), build_entity_index and
# select_candidates (the text encoder) with --device cuda.
#
#   docker build -f docker/gpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/REPO/entityforge-gpu:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/entityforge-gpu:0.1.0
#
# Run with (see README, "Running on Dataflow"):
#   --sdk_container_image REGION-docker.pkg.dev/PROJECT/REPO/entityforge-gpu:0.1.0 --sdk_location container
#   --dataflow_service_options "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
#   --machine_type g2-standard-8 --device cuda
# The NVIDIA driver comes from Dataflow (install-nvidia-driver); PyPI's torch wheels carry the
# CUDA runtime libraries.
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/entityforge
COPY requirements.txt setup.py MANIFEST.in README.md ARCHITECTURE.md ./
COPY pipelines ./pipelines
COPY transforms ./transforms
COPY prompts ./prompts
COPY trainer ./trainer
# The runtime requirements (setup.py reads requirements.txt up to its test section), pinned
# as in CI: torch 2.14.1 + torchvision 0.29.1 are PyPI's CUDA builds.
RUN pip install --no-cache-dir . && python -c "import torch, open_clip, faiss, sentence_transformers, apache_beam"

# Models are loaded from the hub or a gs:// / local checkpoint at run time; bake weights into
# the image (COPY them and pass their path) to start workers without a download.
ENTRYPOINT ["/opt/apache/beam/boot"]
