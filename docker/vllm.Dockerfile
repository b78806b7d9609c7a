# GPU workers that run refine --llm_backend vllm on Dataflow: Beam starts one vLLM server per
# worker VM (Beam's VLLMChatModelHandler) and the pipeline sends it our requests.
#
# vLLM pins its own torch and needs pillow>=13, which Beam 2.77's pillow<13 excludes from one
# environment: vLLM lives in a venv of its own, and ENTITYFORGE_VLLM_PYTHON tells the handler
# which interpreter starts the server (`python -m vllm.entrypoints.openai.api_server`).
#
#   docker build -f docker/vllm.Dockerfile -t REGION-docker.pkg.dev/PROJECT/REPO/entityforge-vllm:0.1.0 .
#
# Run refine with:
#   --llm_backend vllm --model Qwen/Qwen2.5-VL-7B-Instruct
#   --sdk_container_image REGION-docker.pkg.dev/PROJECT/REPO/entityforge-vllm:0.1.0 --sdk_location container
#   --dataflow_service_options "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
#   --machine_type g2-standard-8 --experiments no_use_multiple_sdk_containers
# (one SDK process per VM: the GPU serves one vLLM server; the pipeline's concurrency keeps it busy).
FROM apache/beam_python3.11_sdk:2.77.0

ARG VLLM_VERSION=0.33.0
RUN python -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}" \
    && /opt/vllm/bin/python -c "import vllm"
ENV ENTITYFORGE_VLLM_PYTHON=/opt/vllm/bin/python

WORKDIR /opt/entityforge
COPY requirements.txt setup.py MANIFEST.in README.md ARCHITECTURE.md ./
COPY pipelines ./pipelines
COPY transforms ./transforms
COPY prompts ./prompts
COPY trainer ./trainer
# Beam's vLLM handler imports the openai client in the pipeline's own environment.
RUN pip install --no-cache-dir ".[vllm-client]" && python -c "import apache_beam.ml.inference.vllm_inference"

ENTRYPOINT ["/opt/apache/beam/boot"]
