"""Running the `clipmask` command as a user would: a subprocess with the settings in its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.services import ROOT, settings_env


def clipmask(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def lines(out: subprocess.CompletedProcess) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
