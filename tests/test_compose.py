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


def test_worker_reserves_a_gpu_and_uses_the_threads_pool():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--pool" in worker["command"] and "threads" in worker["command"]
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
