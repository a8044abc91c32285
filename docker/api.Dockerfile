# API, migrations, beat and Flower: no torch in this image.
# Build arguments (defaults: the official Python image and PyPI; `make compose-test` passes a local
# Debian base with Python from Debian's packages and a local wheelhouse):
#   BASE_IMAGE        an image with python3 (>= 3.11) and its venv module
#   PIP_INSTALL_OPTS  extra pip options, e.g. "--no-index --find-links http://host:port/"
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG PIP_INSTALL_OPTS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && useradd --create-home --uid 10001 clipmask \
    && mkdir -p /data && chown clipmask /data
WORKDIR /app
# dependencies first, in a layer that a code change leaves cached
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python3 /tmp/build/requirements.py /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
    && pip install $PIP_INSTALL_OPTS -r /tmp/build/requirements.txt
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY client ./client
COPY evaluation ./evaluation
COPY migrations ./migrations
RUN pip install $PIP_INSTALL_OPTS --no-deps .
USER clipmask
EXPOSE 8000 5555
# gunicorn stops gracefully on SIGTERM (the default); compose runs it under an init (init: true)
HEALTHCHECK --interval=10s --timeout=5s --retries=6 --start-period=20s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)"]
CMD ["gunicorn", "-c", "python:api.gunicorn_conf", "--workers", "4", "--bind", "0.0.0.0:8000", "api.wsgi:app"]
