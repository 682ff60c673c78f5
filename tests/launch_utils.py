"""Helpers for launch tests: free ports, a private loopback sshd for DeepSpeed's pdsh launcher.

The sshd listens on 127.0.0.1-127.0.0.4 only, on a spare port, with its own host key, its own
authorized_keys and its own pid file, and is stopped afterwards; root's ssh settings are untouched.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlip_dist.launching import launch_environment

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launcher_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for launched ranks (see ``mlip_dist.launching``)."""
    return launch_environment(extra)


def missing_tools(*tools: str) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]


@contextmanager
def loopback_sshd(scratch: Path) -> Iterator[dict[str, str]]:
    """Start a private sshd; yields the environment additions pdsh needs (PDSH_SSH_ARGS_APPEND)."""
    scratch.mkdir(parents=True, exist_ok=True)
    key, host_key = scratch / "key", scratch / "hostkey"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    shutil.copy(key.with_suffix(".pub"), scratch / "authorized_keys")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = scratch / "sshd_config"
    lines = [f"Port {port}"] + [f"ListenAddress {host}" for host in LOOPBACK_HOSTS] + [
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {scratch / 'authorized_keys'}",
        "PasswordAuthentication no",
        "PermitRootLogin prohibit-password",
        f"PidFile {scratch / 'sshd.pid'}",
        "StrictModes no",
        "UsePAM no",
        "AcceptEnv *",
    ]
    config.write_text("\n".join(lines) + "\n")
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=open(scratch / "sshd.log", "w"))
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.4", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"sshd did not start: {(scratch / 'sshd.log').read_text()}")
        yield {
            "PDSH_SSH_ARGS_APPEND": f"-p {port} -i {key} -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            "PDSH_RCMD_TYPE": "ssh",
        }
    finally:
        sshd.terminate()
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshd.kill()


def write_deepspeed_env(workdir: Path, env: dict[str, str]) -> None:
    """DeepSpeed's pdsh launcher exports the KEY=VALUE lines of ./.deepspeed_env on every host."""
    keys = ["PATH", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE",
            "TOKENIZERS_PARALLELISM"]
    (workdir / ".deepspeed_env").write_text("".join(f"{k}={env[k]}\n" for k in keys if k in env))
