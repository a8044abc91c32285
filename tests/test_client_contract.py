"""The Python client ships alone: it imports none of the server's packages, and the statuses it
spells itself are the server's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.enums import FINISHED_JOB, BatchStatus
from tests.support.services import ROOT

pytestmark = pytest.mark.unit


def test_the_client_imports_none_of_the_servers_packages():
    code = ("import sys, client; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'shared', 'api', 'worker', 'cli', 'evaluation', 'sqlalchemy', 'celery', 'torch'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_clients_final_statuses_are_the_servers():
    import client

    assert client.FINISHED == {str(s) for s in FINISHED_JOB}
    assert client.BATCH_FINISHED == {BatchStatus.COMPLETED.value, BatchStatus.CANCELED.value}
