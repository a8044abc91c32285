"""docker-compose.yml can't run here (no Docker engine); check what reading can check."""

from __future__ import annotations

import re

import pytest
import yaml

from shared.settings import Settings
from tests.support.services import ROOT

pytestmark = pytest.mark.unit  # no Postgres, Redis, S3 or worker process

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SETTINGS = {f"CLIPMASK_{name.upper()}" for name in Settings.model_fields}


def test_the_services_of_the_stack_are_there():
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "flower"} <= set(SERVICES)


def test_every_clipmask_variable_is_a_real_setting():
    for name, service in SERVICES.items():
        env = service.get("environment") or {}
        unknown = {key for key in env if key.startswith("CLIPMASK_")} - SETTINGS
        assert not unknown, f"{name} sets unknown settings {unknown}"


def test_start_order_and_health():
    api_deps = SERVICES["api"]["depends_on"]
    assert api_deps["migrate"]["condition"] == "service_completed_successfully"
    assert api_deps["minio-init"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["command"] == ["clipmask", "migrate"]
    for name in ("postgres", "redis", "minio", "api", "worker"):
        assert "healthcheck" in SERVICES[name], name
    for name, service in SERVICES.items():
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on missing {dep}"


def test_worker_reserves_a_gpu_and_runs_the_supervised_processes():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # N Celery processes of threads pools (worker/processes.py passes --pool threads), N from the env
    assert worker["command"][:3] == ["python", "-m", "worker.processes"] and "--pool" not in worker["command"]
    assert worker["environment"]["CLIPMASK_WORKER_PROCESSES"] == "${CLIPMASK_WORKER_PROCESSES:-1}"
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.processes", "--ping"]
    assert worker["environment"]["CLIPMASK_DEVICE"] == "cuda"


def test_dockerfiles_exist_and_flower_has_basic_auth():
    for service in SERVICES.values():
        build = service.get("build")
        if build:
            assert (ROOT / build["dockerfile"]).is_file()
    assert "--basic-auth" in " ".join(SERVICES["flower"]["command"])


def test_env_example_lists_every_setting():
    keys = set(re.findall(r"^(CLIPMASK_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert keys == SETTINGS


CI = yaml.safe_load((ROOT / "docker-compose.ci.yml").read_text())["services"]
PRODUCTION_SERVICES = ("migrate", "api", "worker", "beat", "flower")


def test_images_build_anywhere_and_run_as_non_root():
    for name in ("api", "worker"):
        text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
        assert "$PIP_INSTALL_OPTS" in text
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] != "root"
    assert 'ARG TORCH_SPEC="torch>=2.4"' in (ROOT / "docker" / "worker.Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".run"} <= set(ignored)


def test_services_stop_cleanly_and_databases_stay_unpublished():
    for name in PRODUCTION_SERVICES:
        assert SERVICES[name].get("init") is True, name
    for name in ("postgres", "redis"):
        assert "ports" not in SERVICES[name], f"{name} must not collide with the host's own"


def test_the_ci_override_swaps_only_what_cannot_be_pulled():
    assert set(CI) == {"postgres", "redis", "minio", "minio-init", "images", "worker"}
    for name in PRODUCTION_SERVICES:  # built from the project's Dockerfiles, as in production
        assert not {"image", "build", "command", "entrypoint"} & set(CI.get(name, {})), name
    assert set(CI["worker"]) == {"environment", "volumes"}
    assert CI["worker"]["environment"]["CLIPMASK_DEVICE"] == "cpu"
    assert (ROOT / "docker" / "ci" / "postgres.sh").is_file()


def test_beat_flower_and_the_api_start_without_torch():
    """The API image has no torch: what it runs (gunicorn's app, beat and Flower's Celery app, the
    CLI's migrate) must import without it. Beat and Flower once loaded worker.celery_app, which
    imports the engine, and died in the container (found by `make compose-test`)."""
    import subprocess
    import sys

    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'kornia', 'pymatting', 'numba'):\n"
        "            raise ImportError('not in the API image: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import shared.beat_app, api.wsgi, cli.main\n"
        "assert set(shared.beat_app.app.conf.beat_schedule) == {'retention', 'reconcile', 'webhooks'}\n"
    )
    for service in ("beat", "flower"):
        assert "shared.beat_app" in " ".join(SERVICES[service]["command"]), service
    out = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "CLIPMASK_LOG_FORMAT": "text"})
    assert out.returncode == 0, out.stderr[-2000:]
