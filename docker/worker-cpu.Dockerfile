# CPU worker image: data and eval workers (and, in compose.cpu.yaml, training and the native
# inference server). torch is the pinned CPU build from PyTorch's CPU index.
# Build from the repository root: docker build -f docker/worker-cpu.Dockerfile -t nanochat/worker-cpu .
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm@sha256:32ffca7ec9a31f97cbb49393da184d0a9360a07f72a52b69cee342e96ebc4f98
# The exact CPU build ("+cpu" local version): no other torch can satisfy this pin, whatever index
# it comes from. TORCH_FIND_LINKS adds a folder or URL of wheels (an offline mirror of the CPU
# index); TORCH_INDEX_URL then serves torch's own dependencies (filelock, sympy, ...).
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=

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

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG TORCH_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 NCP_HOME=/data/ncp
# torch first, pinned, from the CPU index: resolved from PyPI it would be the multi-GB CUDA build.
# The constraint file then keeps every later install from replacing it.
RUN PIP_FIND_LINKS="${TORCH_FIND_LINKS}" pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt
COPY --from=reqs /src/requirements.txt /tmp/requirements.txt
RUN pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl \
    && python -c "import sys, torch; sys.exit(0 if torch.__version__ == '${TORCH_VERSION}' else f'torch {torch.__version__} is not ${TORCH_VERSION}')" \
    && rm -rf /tmp/wheels /tmp/requirements.txt /tmp/constraints.txt \
    && useradd --create-home --uid 10001 ncp \
    && mkdir -p /data/ncp && chown ncp:ncp /data/ncp
USER 10001
WORKDIR /home/ncp
# A worker is healthy when its Celery node on this host answers a ping through the broker; the
# probe returns on that first reply (`ncp worker --healthcheck`).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["ncp", "worker", "--healthcheck"]
CMD ["ncp", "worker", "--queues", "data"]
