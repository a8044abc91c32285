"""Settings refuse unsafe defaults outside development (pure: no services)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("password", ["change-me", "change-me-please", "changethis", ""])
def test_production_refuses_a_default_or_empty_flower_password(password):
    with pytest.raises(ValidationError, match="CLIPMASK_FLOWER_PASSWORD"):
        Settings(environment="production", flower_password=password)


def test_production_starts_with_a_password_of_its_own_and_development_with_the_default():
    assert Settings(environment="production", flower_password="s3cret-horse-battery").environment == "production"
    assert Settings().flower_password == "change-me" and Settings().environment == "development"


def test_the_refusal_reaches_entry_points_reading_the_environment(monkeypatch):
    monkeypatch.setenv("CLIPMASK_ENVIRONMENT", "production")
    monkeypatch.delenv("CLIPMASK_FLOWER_PASSWORD", raising=False)
    with pytest.raises(ValidationError):
        Settings()
