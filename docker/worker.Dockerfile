# The worker: torch, then clipmask with its engine (transformers, kornia, pymatting).
# Build arguments (defaults: the official Python image, CUDA wheels from PyPI; `make compose-test`
# passes a local Debian base, the pinned CPU build and a local wheelhouse):
#   BASE_IMAGE        an image with python3 (>= 3.11) and its venv module
#   TORCH_SPEC        what pip installs first: "torch>=2.4" (CUDA wheels), "torch==2.13.0" (a CPU build)
#   TORCHVISION_SPEC  installed with it for nvJPEG (CLIPMASK_DEVICE_DECODE): "torchvision" on GPU
#                     images, "" where no torchvision matches the torch (the CPU build here)
#   PIP_INSTALL_OPTS  extra pip options, e.g. "--no-index --find-links http://host:port/"
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_SPEC="torch>=2.4"
ARG TORCHVISION_SPEC="torchvision"
ARG PIP_INSTALL_OPTS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH HF_HOME=/data/huggingface NUMBA_CACHE_DIR=/data/numba
RUN python3 -m venv /opt/venv && useradd --create-home --uid 10001 clipmask \
    && mkdir -p /data/huggingface /data/numba && chown -R clipmask /data
RUN pip install $PIP_INSTALL_OPTS "$TORCH_SPEC" $TORCHVISION_SPEC
WORKDIR /app
# dependencies first, in a layer that a code change leaves cached
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python3 /tmp/build/requirements.py /tmp/build/pyproject.toml worker eval > /tmp/build/requirements.txt \
    && pip install $PIP_INSTALL_OPTS -r /tmp/build/requirements.txt
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY client ./client
COPY evaluation ./evaluation
COPY migrations ./migrations
RUN pip install $PIP_INSTALL_OPTS --no-deps ".[worker,eval]"
USER clipmask
EXPOSE 9808
# Celery's warm shutdown: SIGTERM stops taking jobs and finishes the running ones
STOPSIGNAL SIGTERM
# CLIPMASK_WORKER_PROCESSES Celery worker processes (threads pools), supervised (worker/processes.py)
CMD ["python", "-m", "worker.processes", "--", "--concurrency", "16", "-Q", "interactive,bulk,events", "-E"]
