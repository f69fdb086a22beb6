# Training worker for AMD Instinct MI300X (gfx942): AMD's PyTorch ROCm image, its own torch kept.
# Build from the repository root: docker build -f docker/train-rocm.Dockerfile -t nanochat/train-rocm .
ARG BASE_IMAGE=rocm/pytorch:rocm7.2.4_ubuntu24.04_py3.12_pytorch_release_2.10.0@sha256:4449f856653602317e4101a76fce599c7fcd58ccec2e539951fce5f73083179e
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
# The base image's Python is "externally managed" on Ubuntu 24.04; this image is that environment.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONUNBUFFERED=1 \
    NCP_HOME=/data/ncp \
    HIP_FORCE_DEV_KERNARG=1 PYTORCH_ALLOC_CONF=expandable_segments:True
# bubblewrap: the sandbox HumanEval runs model-written code in (shared/nanochat/eval/sandbox.py).
RUN apt-get update && apt-get install -y --no-install-recommends "bubblewrap=0.*" && rm -rf /var/lib/apt/lists/*
COPY --from=reqs /src/requirements.txt /tmp/requirements.txt
# The constraint pins the image's ROCm torch build: nothing may replace it with a PyPI wheel.
RUN python3 -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
    && python3 -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m pip install --no-deps /tmp/wheels/*.whl \
    && python3 -c "import torch, sys; sys.exit(0 if torch.version.hip else 'torch lost its ROCm build')" \
    && rm -rf /tmp/wheels /tmp/requirements.txt /tmp/constraints.txt \
    && useradd --create-home --uid 10001 ncp \
    && mkdir -p /data/ncp && chown ncp:ncp /data/ncp
# Attention kernel (docs/deploy.md "Attention kernels"): AMD aiter's FlashAttention (Triton) with
# sliding windows forward and backward, as the Hub kernel kernels-community/aiter-flash-attn.
# Fetched here, at image build time, into /opt/nanochat/kernels; at run time
# shared/nanochat/attention.py loads it from disk (HF_HUB_OFFLINE: nothing is downloaded then) and
# probes it against the math reference before use; compiled FlexAttention is the next choice.
# Pin ROCM_ATTN_KERNEL_REVISION to a commit for reproducible images.
ARG KERNELS_VERSION=0.17.2
ARG ROCM_ATTN_KERNEL=kernels-community/aiter-flash-attn
ARG ROCM_ATTN_KERNEL_REVISION=main
COPY docker/fetch_hub_kernel.py /tmp/fetch_hub_kernel.py
RUN python3 -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
    && python3 -m pip install -c /tmp/constraints.txt "kernels==${KERNELS_VERSION}" \
    && HF_HOME=/tmp/hf python3 /tmp/fetch_hub_kernel.py "${ROCM_ATTN_KERNEL}" \
        --revision "${ROCM_ATTN_KERNEL_REVISION}" --dest /opt/nanochat/kernels/aiter-flash-attn \
    && rm -rf /tmp/hf /tmp/fetch_hub_kernel.py /tmp/constraints.txt
ENV HF_HUB_OFFLINE=1
USER 10001
WORKDIR /home/ncp
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["ncp", "worker", "--healthcheck"]
CMD ["ncp", "worker", "--queues", "train"]
