# API image: FastAPI job API, migrations (`ncp db upgrade`) and the reconciler. No torch.
# Build from the repository root: docker build -f docker/api.Dockerfile -t nanochat/api .
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm@sha256:32ffca7ec9a31f97cbb49393da184d0a9360a07f72a52b69cee342e96ebc4f98

# Requirements from pyproject.toml alone: this layer's cache survives source edits.
FROM ${PYTHON_IMAGE} AS reqs
WORKDIR /src
COPY pyproject.toml docker/requirements.py ./
RUN python requirements.py pyproject.toml > requirements.txt

# Our own wheel, built without dependencies.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    NCP_HOME=/data/ncp NCP_API_HOST=0.0.0.0 NCP_API_PORT=8000
COPY --from=reqs /src/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels /tmp/requirements.txt \
    && useradd --create-home --uid 10001 ncp \
    && mkdir -p /data/ncp && chown ncp:ncp /data/ncp
USER 10001
WORKDIR /home/ncp
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "services.api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
