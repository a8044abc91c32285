# GPU worker: torch from the registry's default (CUDA) wheels, then clipmask with its engine.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install "torch>=2.4"
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY client ./client
COPY evaluation ./evaluation
COPY migrations ./migrations
RUN pip install ".[worker,eval]"
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "threads", "--concurrency", "16", "-Q", "interactive,bulk,events", "-E"]
