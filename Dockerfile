# The transcription server on an NVIDIA GPU (it falls back to the CPU when none is visible).
#   docker build -t rta .
#   docker run --gpus all -p 8000:8000 --stop-timeout 60 -v hf-cache:/home/app/.cache/huggingface rta
# See README.md, "Deployment".

# The CUDA release torch==2.13.0's PyPI wheel is built for. Only the small `base` flavour: torch brings
# cuBLAS, cuDNN and NCCL as pip packages, so a -runtime/-cudnn image would hold them twice. The image
# still makes the NVIDIA runtime check that the host driver supports CUDA 13.0 (driver >= 580).
FROM nvidia/cuda:13.0.3-base-ubuntu24.04

# Ubuntu 24.04's Python is 3.12. No FFmpeg, libsndfile or PortAudio: the av and soundfile wheels bundle
# theirs, and the command-line client (rta_client, with sounddevice and PortAudio) is not in the image.
# Not pinned: Ubuntu replaces package versions with each security update, so pins break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Runs as uid 1000, the owner of most hosts' bind-mounted folders; the image's `ubuntu` user gives it up
# (userdel may only complain about a missing mail spool; a uid still taken fails groupadd/useradd).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /home/app/.cache/huggingface /app/audio_chunks \
    && chown -R app:app /home/app/.cache /app/audio_chunks

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Dependencies first, so code changes do not reinstall torch.
COPY requirements.txt /tmp/requirements.txt
# boto3 too (the `s3` extra in pyproject.toml): in a cluster the recordings reach S3 or nowhere.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r /tmp/requirements.txt boto3==1.44.5 \
    && rm /tmp/requirements.txt

# The code stays owned by root: the server can write only its two data folders.
WORKDIR /app
COPY LICENSE main.py gunicorn.conf.py ./
COPY real_time_audio ./real_time_audio

# Settings not given here take their defaults (README.md, "Configuration"); pass others with -e.
# MODEL_FALLBACK=false: a missing model stops the container instead of serving another one.
# API_DOCS=false: no interactive API documentation in production.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    HF_HOME=/home/app/.cache/huggingface \
    MODEL_CACHE_DIR=/home/app/.cache/huggingface/converted \
    MODEL_FALLBACK=false \
    API_DOCS=false \
    AUDIO_STORAGE_DIR=/app/audio_chunks

# Downloaded models and session recordings outlive the container.
VOLUME ["/home/app/.cache/huggingface", "/app/audio_chunks"]

USER 1000:1000
EXPOSE 8000

# Healthy while the process serves and its engine lives: /health turns 503 only if the engine dies
# (which only a restart cures). /ready is for load balancers: it is also 503 while the model loads,
# while every session slot is taken and while draining, none of which makes a container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['PORT'] + '/health', timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "main:app"]
