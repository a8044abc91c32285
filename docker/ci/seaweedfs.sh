#!/bin/sh
# SeaweedFS as compose-test's "minio": the identities file from MinIO's variables (no anonymous
# access), every component inside this container on 127.0.0.1, the S3 gateway on :9000.
set -eu
umask 077
printf '{"identities":[{"name":"clipmask","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}\n' \
  "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" >/data/s3-identities.json
exec weed -logtostderr server -dir=/data -ip=127.0.0.1 -ip.bind=0.0.0.0 -master.volumeSizeLimitMB=64 -volume.max=0 \
  -s3 -s3.port=9000 -s3.port.iceberg=0 -s3.port.lance=0 -s3.autoCreateBucket=false -s3.config=/data/s3-identities.json
