# API, migrations and Flower: no torch in this image.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
COPY client ./client
COPY evaluation ./evaluation
COPY migrations ./migrations
RUN pip install .
RUN useradd --create-home clipmask
USER clipmask
EXPOSE 8000 5555
CMD ["gunicorn", "-c", "python:api.gunicorn_conf", "--workers", "4", "--bind", "0.0.0.0:8000", "api.wsgi:app"]
