# CPU worker image: data and eval workers (and, in compose.cpu.yaml, training and the native
# inference server). torch is the pinned CPU build from PyTorch's CPU index.
# Build from the repository root: docker build -f docker/worker-cpu.Dockerfile -t nanochat/worker-cpu .
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
ARG TORCH_VERSION=2.13.0

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
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 NCP_HOME=/data/ncp
# bubblewrap: the sandbox HumanEval runs model-written code in (shared/nanochat/eval/sandbox.py).
RUN apt-get update && apt-get install -y --no-install-recommends "bubblewrap=0.*" && rm -rf /var/lib/apt/lists/*
# torch first and from the CPU index: resolved from PyPI it would be the multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
COPY --from=reqs /src/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl \
    && python -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('${TORCH_VERSION}') else 1)" \
    && rm -rf /tmp/wheels /tmp/requirements.txt \
    && useradd --create-home --uid 10001 ncp \
    && mkdir -p /data/ncp && chown ncp:ncp /data/ncp
USER 10001
WORKDIR /home/ncp
# A worker is healthy when its Celery node (named <queues>-<pid>@<hostname> by `ncp worker`)
# answers a ping through the broker.
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A services.worker.celery_app:app inspect ping --timeout 10 | grep -q \"@$(hostname): OK\""]
CMD ["ncp", "worker", "--queues", "data"]
