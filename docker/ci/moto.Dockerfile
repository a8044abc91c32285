# An S3-protocol server for `make compose-test`, where MinIO can't be had (it is in no Debian
# release and Docker Hub can't be reached): moto's server mode, from the same wheelhouse.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG PIP_INSTALL_OPTS=""
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv && pip install $PIP_INSTALL_OPTS "moto[server]>=5.0" && useradd --uid 10002 moto
USER moto
EXPOSE 9000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
