"""Checkpoint bookkeeping around DeepSpeed's ``save_checkpoint``/``load_checkpoint``.

DeepSpeed writes each checkpoint into ``<dir>/<tag>/`` and then the ``latest`` file; we add, per tag,
a ``complete`` marker written atomically after every rank finished, the per-rank RNG states, and
pruning of all but the last ``keep_last`` complete checkpoints. ``find_latest`` only ever returns a
tag with a ``complete`` marker, so a crash in the middle of a save leaves the previous one in use.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "complete.json"
CONSOLIDATED_WEIGHTS = "model.safetensors"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def complete_tags(checkpoint_dir: str | Path) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint whose save finished on all ranks, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    tags = []
    for child in root.iterdir():
        match = TAG_PATTERN.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            tags.append((int(match.group(1)), child.name))
    return sorted(tags)


def find_latest(checkpoint_dir: str | Path) -> str | None:
    tags = complete_tags(checkpoint_dir)
    return tags[-1][1] if tags else None


def mark_complete(checkpoint_dir: str | Path, tag: str, info: dict[str, Any]) -> None:
    atomic_write_text(Path(checkpoint_dir) / tag / COMPLETE_MARKER, json.dumps(info, indent=2))


def prune(checkpoint_dir: str | Path, keep_last: int) -> list[str]:
    """Delete complete checkpoints older than the last ``keep_last``, and stale partial ones below them."""
    tags = complete_tags(checkpoint_dir)
    removed = []
    if len(tags) <= keep_last:
        return removed
    oldest_kept_step = tags[-keep_last][0]
    for child in Path(checkpoint_dir).iterdir():
        match = TAG_PATTERN.match(child.name)
        if match and int(match.group(1)) < oldest_kept_step:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": json.dumps(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python_state = json.loads(state["python"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(checkpoint_dir: str | Path, tag: str, rank: int) -> None:
    path = Path(checkpoint_dir) / tag / f"rng_rank{rank:05d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, path)


def load_rng(checkpoint_dir: str | Path, tag: str, rank: int) -> bool:
    path = Path(checkpoint_dir) / tag / f"rng_rank{rank:05d}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True


def save_consolidated_weights(module: torch.nn.Module, path: Path, rank: int, zero_stage: int) -> None:
    """Write the full fp32 state dict of ``module`` as safetensors (rank 0), whatever the ZeRO stage.

    Evaluation and export read this file instead of DeepSpeed's pickled shards, so they never unpickle.
    Under ZeRO-3 every rank must call this: parameters are gathered collectively.
    """
    from contextlib import nullcontext

    from safetensors.torch import save_file

    params = list(module.parameters())
    if zero_stage == 3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        context = nullcontext()
    with context:
        if rank == 0:
            tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in module.state_dict().items()}
            tmp = path.with_suffix(".safetensors.tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path)
