"""``make compose-test``: docker-compose.yml, for real, in containers.

Builds the image, starts the compose file with 2 servers and 3 workers on a
short MNIST-1D job, follows the job with ``ps-scheduler status --watch``
inside the scheduler's container, prints the accuracy, checks the
scheduler's metrics on the host port the file publishes, and always takes
the containers and their volume down again.

It uses Docker where Docker has an engine, else Podman and podman-compose
(set up as docs/containers.md describes when Podman is missing, and
the base image built from Debian's packages when no registry can be
reached). Not part of ``make test``: it needs root or a container engine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "gradstore-test"
BASE_IMAGE = "docker.io/library/python:3.11-slim"
WORKERS = 3
MIN_ACCURACY = 0.85
JOB = {
    "PS_DATASET": "mnist1d",
    "PS_MODEL": "mnist1d-cnn",
    "PS_MODE": "sync",
    "PS_EPOCHS": "8",
    "PS_LR": "0.01",
    "PS_BETA1": "0.9",
    "PS_BATCH_SIZE": "100",
    "PS_EXPECTED_WORKERS": str(WORKERS),
}
PODMAN_CONF = """[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def say(message: str) -> None:
    print(f"compose-test: {message}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    say("$ " + " ".join(str(a) for a in argv))
    return subprocess.run(argv, check=True, **kw)


def docker_works() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def setup_podman() -> None:
    """Podman as docs/containers.md describes it (Debian's packages, runc, cgroupfs)."""
    if shutil.which("podman") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit(
                "compose-test: no Docker engine and no Podman; install one (as root this "
                "script installs Podman with apt-get; see docs/containers.md)"
            )
        say("installing Podman from Debian's packages")
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "podman", "runc", "debootstrap"])
    conf = Path("/etc/containers/containers.conf")
    if os.geteuid() == 0 and not conf.exists():
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(PODMAN_CONF)
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return
    say(f"no registry: building {BASE_IMAGE} from Debian's packages (about a minute)")
    if shutil.which("debootstrap") is None:
        run(["apt-get", "install", "-y", "-qq", "debootstrap"])
    rootfs = Path("/var/tmp/gradstore-base/rootfs")
    if not (rootfs / "usr/bin/python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        packages = "--include=python3,python3-venv,python3-pip,ca-certificates"
        mirror = "http://deb.debian.org/debian"
        run(["debootstrap", "--variant=minbase", packages, "bookworm", str(rootfs), mirror])
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/")
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout)
    tar.wait()


def torch_wheel() -> None:
    """The small CPU wheel of torch in ./wheels, so the image build downloads no CUDA."""
    if any((ROOT / "wheels").glob("torch-*.whl")):
        return
    spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", "wheels", spec])


def main() -> int:
    os.chdir(ROOT)
    env = {**os.environ, **JOB, "PS_TOKEN": secrets.token_hex(16)}
    if docker_works():
        compose = ["docker", "compose", "-p", PROJECT]
        build = [*compose, "build"]
        exec_ = [*compose, "exec", "-T", "scheduler"]
    else:
        setup_podman()
        podman_compose = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
        compose = [podman_compose or "podman-compose", "-p", PROJECT]
        build = ["podman", "build", "--pull=never", "--network=host", "-t", "gradstore:latest", "."]
        exec_ = [*compose, "exec", "-T", "scheduler"]
    torch_wheel()
    run(build, env=env)
    try:
        run([*compose, "up", "-d", "--no-build", "--scale", f"worker={WORKERS}"], env=env)
        say(f"training MNIST-1D with 2 servers and {WORKERS} workers in containers")
        status = ["ps-scheduler", "status", "--scheduler", "127.0.0.1:7000"]
        run([*exec_, *status, "--watch", "--interval", "5"], env=env, timeout=1200)
        reply = run([*exec_, *status, "--json"], env=env, capture_output=True, text=True)
        progress = json.loads(reply.stdout)
        metrics = urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=10).read()
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        say(f"failed: {e}")
        subprocess.run([*compose, "logs"], env=env)
        return 1
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, capture_output=True)
    accuracy = progress["evaluations"][-1]["accuracy"] if progress["evaluations"] else 0.0
    finished = b"ps_scheduler_finished 1.0" in metrics
    say(
        f"{'finished' if progress['finished'] else 'NOT finished'}: {len(progress['workers'])} "
        f"workers, {progress['epochs']} epochs, final test accuracy {accuracy:.4f}; the "
        f"scheduler's metrics on 127.0.0.1:9100 say finished={finished}"
    )
    ok = progress["finished"] and finished and accuracy >= MIN_ACCURACY
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
