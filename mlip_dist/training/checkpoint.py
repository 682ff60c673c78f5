"""Checkpoint bookkeeping around DeepSpeed's ``save_checkpoint``/``load_checkpoint``.

DeepSpeed writes each checkpoint into ``<dir>/<tag>/`` and then the ``latest`` file; we add, per tag,
a ``complete`` marker written atomically after every rank finished, the per-rank RNG states, and
pruning of all but the last ``keep_last`` complete checkpoints. ``find_latest`` only ever returns a
tag with a ``complete`` marker, so a crash in the middle of a save leaves the previous one in use.
DeepSpeed's own ``latest`` file is written by :func:`mark_complete` (never by DeepSpeed), so it too only
ever names a complete checkpoint. A failed write (disk full, I/O error) raises
:class:`CheckpointSaveError` naming the folder and the previous complete checkpoint, which is untouched.

Trust: DeepSpeed's ``*_states.pt`` files are pickles that ``load_checkpoint`` unpickles; they are read
only to resume the job that wrote them. RNG states are loaded with ``weights_only=True`` and the
consolidated weights, which evaluation and export read, are safetensors.
"""

from __future__ import annotations

import errno
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
LATEST_FILE = "latest"  # the name DeepSpeed's load_checkpoint(tag=None) and zero_to_fp32.py read
CONSOLIDATED_WEIGHTS = "model.safetensors"
UNIVERSAL_DIR = "universal"  # <dir>/universal/<tag>: DeepSpeed's universal form, to resume on another world size
BEST_FILE = "best"  # JSON naming the complete checkpoint with the best validation metric; never pruned


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


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def find_latest(checkpoint_dir: str | Path) -> str | None:
    tags = complete_tags(checkpoint_dir)
    return tags[-1][1] if tags else None


def read_best(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """``{"tag", "step", "metric", "value"}`` of the best checkpoint, or None if the run has none."""
    path = Path(checkpoint_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def find_best(checkpoint_dir: str | Path) -> str | None:
    best = read_best(checkpoint_dir)
    if best is None or not (Path(checkpoint_dir) / best["tag"] / COMPLETE_MARKER).is_file():
        return None
    return str(best["tag"])


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the folder, the cause and what is still usable."""


def mark_complete(checkpoint_dir: str | Path, tag: str, info: dict[str, Any]) -> None:
    """Declare ``tag`` complete (rank 0, after every rank finished writing): marker, then ``latest``."""
    atomic_write_text(Path(checkpoint_dir) / tag / COMPLETE_MARKER, json.dumps(info, indent=2))
    atomic_write_text(Path(checkpoint_dir) / LATEST_FILE, tag)


def clear_complete(checkpoint_dir: str | Path, tag: str) -> None:
    """Remove a stale marker before ``tag`` is written again (e.g. a run resumed from an older tag)."""
    (Path(checkpoint_dir) / tag / COMPLETE_MARKER).unlink(missing_ok=True)


def save_training_checkpoint(
    engine: Any,
    checkpoint_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    info: dict[str, Any],
    *,
    rank: int,
    keep_last: int,
    consolidated: bool = True,
    frozen: dict[str, torch.Tensor] | None = None,
    best: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> str:
    """Save a DeepSpeed checkpoint at ``step`` on every rank, then mark it complete and prune (rank 0).

    Collective: every rank must call it. Guarantees: the ``complete`` marker and ``latest`` are written
    only after all ranks' files (DeepSpeed states, RNG, consolidated safetensors when
    ``consolidated``: the fp32 masters, frozen parameters from ``frozen``) are on disk; on an ``OSError`` (e.g. ENOSPC) or a torch
    writer failure, raises :class:`CheckpointSaveError` and leaves the previous complete checkpoint and
    ``latest`` as they were. ``best`` (metric, value) marks this checkpoint as the run's best: the ``best`` file
    is rewritten after the marker and before pruning, which never removes the tag it names. ``weights``:
    :func:`full_fp32_state_dict` of the engine already taken at this step (validation's), written as the
    consolidated weights instead of gathering the masters a second time. Returns the tag.
    """
    import torch.distributed as dist

    root = Path(checkpoint_dir)
    tag = tag_for_step(step)
    previous = find_latest(root)
    if rank == 0:
        clear_complete(root, tag)
    dist.barrier()  # nobody writes into ``tag`` while a stale marker could still make it look complete
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        save_rng(root, tag, rank)
        if consolidated:
            save_consolidated_weights(engine, root / tag / CONSOLIDATED_WEIGHTS, rank, frozen, weights)
    except (OSError, RuntimeError) as err:
        # torch.save reports a full disk as an opaque RuntimeError ("unexpected pos 128 vs 0"), so
        # compare free space with the size of the last checkpoint to say what happened.
        free = shutil.disk_usage(root).free
        needed = folder_bytes(root / previous) if previous else 0
        full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < max(needed, 2**20)
        space = f"{free / 2**20:.1f} MiB free there, the last checkpoint takes {needed / 2**20:.1f} MiB"
        hint = f"the disk is full ({space}); free space" if full else f"fix the cause ({space})"
        kept = f"the previous complete checkpoint {root / previous} is intact" if previous else "no earlier checkpoint"
        raise CheckpointSaveError(
            f"rank {rank}: could not write checkpoint {root / tag} ({type(err).__name__}: {err}); {kept}; "
            f"{hint} and restart with --resume auto"
        ) from err
    dist.barrier()
    if rank == 0:
        mark_complete(root, tag, info)
        if best is not None:
            atomic_write_text(root / BEST_FILE, json.dumps({"tag": tag, "step": step, **best}, indent=2))
        prune(root, keep_last)
    dist.barrier()
    return tag


def prune(checkpoint_dir: str | Path, keep_last: int) -> list[str]:
    """Delete complete checkpoints older than the last ``keep_last``, and stale partial ones below them; the
    checkpoint named in the ``best`` file is always kept."""
    tags = complete_tags(checkpoint_dir)
    removed: list[str] = []
    if len(tags) <= keep_last:
        return removed
    oldest_kept_step = tags[-keep_last][0]
    best = read_best(checkpoint_dir)
    for child in Path(checkpoint_dir).iterdir():
        match = TAG_PATTERN.match(child.name)
        if match and int(match.group(1)) < oldest_kept_step and not (best and child.name == best["tag"]):
            shutil.rmtree(child, ignore_errors=True)
            shutil.rmtree(Path(checkpoint_dir) / UNIVERSAL_DIR / child.name, ignore_errors=True)
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


def frozen_fp32_copies(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the parameters no optimizer updates (``requires_grad=False``), taken before
    ``deepspeed.initialize``: in bf16 mode DeepSpeed casts the whole module to bf16 and keeps fp32 masters
    only for the trainable parameters, so this is the only place a frozen layer's fp32 value survives."""
    return {name: param.detach().float().cpu().clone()
            for name, param in module.named_parameters() if not param.requires_grad}


def _unfused_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """bf16 ZeRO-0 with a torch optimizer: DeepSpeed's unfused optimizer keeps the fp32 masters in
    ``fp32_groups``, parallel to the module's low-precision ``fp16_groups``; no accessor maps them."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high:
        return {}
    return {id(p): m for lows, highs in zip(low, high, strict=True) for p, m in zip(lows, highs, strict=True)}


def full_fp32_state_dict(engine: Any, frozen: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The engine's module state dict with every parameter at full fp32 precision, on the CPU.

    Trainable parameters are the optimizer's fp32 masters, not the module's parameters, which in bf16 mode
    are bf16 copies: ``deepspeed.utils.safe_get_full_fp32_param`` (ZeRO-1/2 through their high-precision
    mappings, ZeRO-3 gathered from the partitions) or, at ZeRO-0 in bf16, the unfused optimizer's
    ``fp32_groups``. Frozen parameters come from ``frozen`` (:func:`frozen_fp32_copies`), buffers
    (BatchNorm statistics) from the module as they are. Where no master exists (fp32 ZeRO-0, where the
    module holds the masters, or a frozen parameter without a copy) the module's own parameter is used,
    gathered under ZeRO-3. Collective under ZeRO: every rank calls it, in the same parameter order.
    """
    from contextlib import nullcontext

    from deepspeed.utils import safe_get_full_fp32_param

    module, frozen = engine.module, frozen or {}
    unfused = _unfused_masters(engine.optimizer)
    full: dict[int, torch.Tensor] = {}
    live: list[torch.nn.Parameter] = []
    for name, param in module.named_parameters():
        if param.requires_grad:
            master = unfused.get(id(param)) if unfused else safe_get_full_fp32_param(param)
        else:
            master = frozen.get(name)
        if master is None:
            live.append(param)
        else:
            full[id(param)] = master.detach().float().cpu().contiguous()
    if engine.zero_optimization_stage() == 3 and live:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(live, modifier_rank=None)
    else:
        context = nullcontext()
    with context:
        for param in live:
            full[id(param)] = param.detach().float().cpu().clone().contiguous()
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    state = {}
    for key in module.state_dict():
        if key in params:
            state[key] = full[id(params[key])]
        else:
            buffer = buffers[key].detach().cpu()
            state[key] = (buffer.float() if buffer.is_floating_point() else buffer).contiguous()
    return state


def save_consolidated_weights(engine: Any, path: Path, rank: int, frozen: dict[str, torch.Tensor] | None = None,
                              tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write :func:`full_fp32_state_dict` of the engine as safetensors (rank 0), whatever the ZeRO stage and
    precision: the fp32 master weights, which evaluation and export read instead of DeepSpeed's pickled
    shards, so they never unpickle. Collective under ZeRO: every rank must call it (unless ``tensors``, that
    state already gathered at this step, is given on every rank).
    """
    from safetensors.torch import save_file

    if tensors is None:
        tensors = full_fp32_state_dict(engine, frozen)
    if rank == 0:
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
