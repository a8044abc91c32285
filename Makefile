# clipmask: the native workflow. See README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU installs pin torch to the local CPU build; a GPU host sets TORCH_SPEC=torch (CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
export VENV
# Compiled bytecode is kept between runs: with PYTHONDONTWRITEBYTECODE set (as on some CI machines),
# every run compiles the project and rewrites every test module's asserts again (collection 12.8 s -> 6.7 s).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install install-browser stock-venv up down status demo test test-unit fuzz lint typecheck bench bench-load bench-api bench-fairness bench-wait bench-outputs bench-pipeline bench-search bench-manifest bench-decoders bench-refine compose-test gpu-check gpu-bundle clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[worker,dev,eval]'
	touch $@

up: install
	scripts/stack.sh up

down:
	scripts/stack.sh down

status:
	@scripts/stack.sh status

demo: install
	scripts/demo.sh

test: install install-browser stock-venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The reference environment for the SAM 3 stock-equivalence test (tests/worker/test_sam3.py): stock
# Sam3Processor needs torchvision, which does not import beside the CPU torch above; torch 2.14.1 and
# torchvision 0.29.1 do (a CUDA build: 5.5 GB, about 70 s from the machine's wheels; README "SAM 3 and
# torchvision"). Only that test's stock side runs in it.
STOCK_VENV ?= .venv-stock
stock-venv: $(STOCK_VENV)/.installed

$(STOCK_VENV)/.installed: pyproject.toml
	test -x $(STOCK_VENV)/bin/python || python3 -m venv $(STOCK_VENV)
	$(STOCK_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 \
	  "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')" pillow numpy
	touch $@

# Debian's chromium for the web page's browser test (Playwright drives it; no browser download)
install-browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; }
	@chromium --version

# docker-compose.yml for real: the production images built and the stack run end to end, with
# docker-compose.ci.yml swapping in what can't be pulled here (README "Docker compose")
compose-test: install
	$(PY) scripts/compose_test.py $(COMPOSE_TEST_ARGS)

# the tests that need no Postgres, Redis, S3 or worker process (marker `unit`)
test-unit: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

# schemathesis against a private live stack (FUZZ_EXAMPLES per operation, FUZZ_MAX_TIME seconds),
# then the hypothesis tests on the parsers and the API's strings with the "fuzz" profile
fuzz: install
	scripts/fuzz.sh $(FUZZ_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# mypy on shared/, api/, worker/, client/, cli/ (the files list is in pyproject.toml)
typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/engine.py --model tiny --images 8 --prompts 4

# 200 clients holding Prefer: wait while plain GETs are timed (private stack, tiny model)
bench-wait: install
	scripts/bench_stack.sh bench/waiting.py $(BENCH_ARGS)

# peak RSS of writing a 100k-item batch manifest with embeddings: built in memory (before) vs streamed
bench-manifest: install
	scripts/bench_stack.sh bench/manifest.py $(BENCH_ARGS)

# a batch whose images use different fine-tuned decoders against one decoder, and a decoder's first use
bench-decoders: install
	$(PY) bench/decoders.py $(BENCH_ARGS)

# refine: none (bilinear) against guided and matting on synthetic garments, and their cost per image
bench-refine: install
	$(PY) bench/refine.py $(BENCH_ARGS)

# the worker's host side with an instant model stand-in: the ceiling a GPU worker can't pass
bench-pipeline: install
	$(PY) bench/pipeline.py $(BENCH_ARGS)

# what each output kind costs per image at 1024x1536 (engine + encoding, no stack)
bench-outputs: install
	$(PY) bench/outputs.py $(BENCH_ARGS)

# search latency p50/p99 at 10k, 100k and 1M stored vectors, HNSW recall@10, and what embed costs
bench-search: install
	$(PY) bench/search.py $(BENCH_ARGS)

# on a CUDA host with torch and transformers installed: engine tests on CUDA + GPU benchmarks
gpu-check:
	scripts/gpu_check.sh

# the stack's packages, Postgres with pgvector and redis-server for gpu-check's e2e step on a GPU
# machine without them (.gpu/site.tar.xz, carried by the device tool)
gpu-bundle:
	scripts/gpu_bundle.sh

# 5,000 jobs through a private stack on the tiny model (BENCH_ARGS="--jobs 500" for less)
bench-load: install
	scripts/bench_stack.sh bench/load.py $(BENCH_ARGS)

# the bulk lane's fair share: shares by weight, a newcomer's wait, dispatch capacity, batch accept
bench-fairness: install
	$(PY) bench/fairness.py $(BENCH_ARGS)

# batch accept time, single-job POST throughput/latency, interactive latency during a bulk run
bench-api: install
	scripts/bench_stack.sh bench/api.py $(BENCH_ARGS)

clean: down
	scripts/pgvector.sh stop
	rm -rf .run
