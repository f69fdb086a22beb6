# Training worker for NVIDIA GPUs: the official PyTorch CUDA runtime image, its own torch kept.
# Build from the repository root: docker build -f docker/train-cuda.Dockerfile -t nanochat/train-cuda .
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:6acf597eeb8e376a96580dde4952f37cc017fef732bb40bfc73f28f25e3f64b4
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm@sha256:32ffca7ec9a31f97cbb49393da184d0a9360a07f72a52b69cee342e96ebc4f98

FROM ${PYTHON_IMAGE} AS reqs
WORKDIR /src
COPY pyproject.toml docker/requirements.py ./
RUN python requirements.py pyproject.toml --extra report > requirements.txt

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 NCP_HOME=/data/ncp \
    PYTORCH_ALLOC_CONF=expandable_segments:True
# bubblewrap: the sandbox HumanEval runs model-written code in (shared/nanochat/eval/sandbox.py).
RUN apt-get update && apt-get install -y --no-install-recommends "bubblewrap=0.*" && rm -rf /var/lib/apt/lists/*
COPY --from=reqs /src/requirements.txt /tmp/requirements.txt
# The constraint pins the image's CUDA torch build: nothing may replace it.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
    && python -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN python -m pip install --no-deps /tmp/wheels/*.whl \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch lost its CUDA build')" \
    && rm -rf /tmp/wheels /tmp/requirements.txt /tmp/constraints.txt \
    && useradd --create-home --uid 10001 ncp \
    && mkdir -p /data/ncp && chown ncp:ncp /data/ncp
# Attention kernel (docs/deploy.md "Attention kernels"): FlashAttention-3 for Hopper, sliding
# windows forward and backward, as the Hub kernel kernels-community/flash-attn3 built for this
# torch. Fetched here, at image build time, into /opt/nanochat/kernels; at run time
# shared/nanochat/attention.py loads it from disk (HF_HUB_OFFLINE: nothing is downloaded then) and
# probes it against the math reference before use. No build for this torch fails the image build.
ARG KERNELS_VERSION=0.17.2
ARG FA3_KERNEL=kernels-community/flash-attn3
ARG FA3_KERNEL_VERSION=1
COPY docker/fetch_hub_kernel.py /tmp/fetch_hub_kernel.py
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
    && python -m pip install -c /tmp/constraints.txt "kernels==${KERNELS_VERSION}" \
    && HF_HOME=/tmp/hf python /tmp/fetch_hub_kernel.py "${FA3_KERNEL}" --version "${FA3_KERNEL_VERSION}" \
        --dest /opt/nanochat/kernels/flash-attn3 \
    && rm -rf /tmp/hf /tmp/fetch_hub_kernel.py /tmp/constraints.txt
ENV HF_HUB_OFFLINE=1
USER 10001
WORKDIR /home/ncp
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["ncp", "worker", "--healthcheck"]
CMD ["ncp", "worker", "--queues", "train"]
