# Inference image for NVIDIA GPUs: the vLLM project's CUDA image, with our package installed so the
# nanochat vLLM plugin's entry point (vllm.general_plugins) registers. vLLM's torch is kept.
# Build from the repository root: docker build -f docker/inference-cuda.Dockerfile -t nanochat/inference-cuda .
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm@sha256:32ffca7ec9a31f97cbb49393da184d0a9360a07f72a52b69cee342e96ebc4f98

# Only what the supervisor, the plugin and the native fallback server need beyond vLLM's own.
FROM ${PYTHON_IMAGE} AS reqs
WORKDIR /src
COPY pyproject.toml docker/requirements.py ./
RUN python requirements.py pyproject.toml \
      --only numpy,tokenizers,regex,safetensors,pydantic,pydantic-settings,fastapi,uvicorn,sse-starlette,httpx,prometheus-client,psutil,pyyaml,jinja2 \
      > requirements.txt

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${VLLM_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONUNBUFFERED=1 \
    NCP_HOME=/data/ncp NCP_INFERENCE_ENGINE=vllm NCP_INFERENCE_HOST=0.0.0.0 NCP_INFERENCE_PORT=8001
COPY --from=reqs /src/requirements.txt /tmp/requirements.txt
# Everything vLLM already ships (torch included) is pinned to its installed version, so adding our
# few dependencies can never swap vLLM's own.
RUN python3 -m pip freeze | grep -v ' @ ' > /tmp/constraints.txt \
    && python3 -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m pip install --no-deps /tmp/wheels/*.whl \
    && python3 -c "from importlib.metadata import entry_points as e; import sys; sys.exit(0 if any(p.name == 'nanochat' for p in e(group='vllm.general_plugins')) else 'nanochat vLLM plugin not registered')" \
    && rm -rf /tmp/wheels /tmp/requirements.txt /tmp/constraints.txt \
    && useradd --create-home --uid 10001 ncp \
    && mkdir -p /data/ncp && chown ncp:ncp /data/ncp
USER 10001
WORKDIR /home/ncp
EXPOSE 8001
# Loading a model can take minutes; /health is answered by the served engine through the supervisor.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=5 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/health', timeout=4)"]
ENTRYPOINT []
CMD ["python3", "-m", "services.inference.serve"]
