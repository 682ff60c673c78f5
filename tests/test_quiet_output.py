"""Clean output (issue 18): library noise a user cannot act on stays off the terminal, real problems do not.

* Loading the pretrained text encoder prints no transformers "Loading weights" bar and no load-report
  table, but a folder whose weights do not fit the encoder still raises (missing or mis-shaped weights)
  or warns in one line (checkpoint weights the encoder does not use, other than the dropped pooler).
* ``gather_with_grad`` uses a collective torch does not deprecate, keeps its gradient (the sum over
  ranks of the gradients reaching each rank's rows), and the FutureWarnings torch raises inside
  DeepSpeed's own collectives are filtered by ``setup_logging`` while other FutureWarnings still show.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch_utils import free_port

from mlip_dist.config import TextEncoderConfig
from mlip_dist.distributed import gather_with_grad
from mlip_dist.logging_utils import quiet_library_warnings, setup_logging

WORLD = 2
ROWS, DIM = 3, 4
NOISE = ("LOAD REPORT", "Loading weights", "UNEXPECTED", "FutureWarning", "is deprecated")


def _weights_folder(minilm_path: str, out: Path, edit) -> Path:
    """A copy of the MiniLM folder (config + weights only) with its state dict changed by ``edit``."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    shutil.copy(Path(minilm_path) / "config.json", out / "config.json")
    state = load_file(str(Path(minilm_path) / "model.safetensors"))
    save_file(edit(state), str(out / "model.safetensors"))
    return out


def test_pretrained_text_encoder_loads_without_library_output(minilm_path, capfd, caplog):
    from transformers.utils import logging as hf_logging

    from mlip_dist.models.text_encoder import _REPORT_LOGGERS, TextEncoder

    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        encoder = TextEncoder(TextEncoderConfig(path=minilm_path))
    out, err = capfd.readouterr()
    assert encoder.hidden_size == 384
    printed = out + err + caplog.text
    assert not [word for word in NOISE if word in printed], printed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Nothing of the quieting outlives the load: transformers' own bars and reports work as before.
    assert hf_logging.set_tqdm_hook(None) is None
    assert all(not logging.getLogger(name).filters for name in _REPORT_LOGGERS)


def test_missing_weights_are_an_error_naming_them(minilm_path, tmp_path):
    from mlip_dist.models.text_encoder import TextEncoder

    folder = _weights_folder(minilm_path, tmp_path / "partial",
                             lambda state: {k: v for k, v in state.items() if "layer.5." not in k})
    with pytest.raises(RuntimeError, match=r"16 weights missing from the checkpoint: encoder\.layer\.5\.") as info:
        TextEncoder(TextEncoderConfig(path=str(folder)))
    assert str(folder) in str(info.value) and "randomly initialised" in str(info.value)


def test_mis_shaped_weights_are_an_error_with_the_report(minilm_path, tmp_path):
    from mlip_dist.models.text_encoder import TextEncoder

    key = "encoder.layer.0.attention.self.query.weight"

    def reshape(state):
        name = next(k for k in state if k.endswith(key))
        return {**state, name: torch.zeros(10, 10)}

    folder = _weights_folder(minilm_path, tmp_path / "shapes", reshape)
    with pytest.raises(RuntimeError, match="could not load the text encoder") as info:
        TextEncoder(TextEncoderConfig(path=str(folder)))
    message = str(info.value)
    assert key in message and "MISMATCH" in message and "\x1b[" not in message


def test_unused_checkpoint_weights_warn_in_one_line(minilm_path, tmp_path, capfd, caplog):
    from mlip_dist.models.text_encoder import TextEncoder

    folder = _weights_folder(minilm_path, tmp_path / "head",
                             lambda state: {**state, "cls.predictions.bias": torch.zeros(3)})
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        TextEncoder(TextEncoderConfig(path=str(folder)))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "cls.predictions.bias" in warned[0] and "pooler" not in warned[0], warned
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err


def test_only_the_deepspeed_collective_deprecations_are_filtered():
    deepspeed_calls = (
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single`.",
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single`.",
        "`torch.distributed._all_gather_base` is a private function and will be deprecated. Please use ...",
    )
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            setup_logging(0)
            quiet_library_warnings()  # idempotent
            for message in deepspeed_calls:
                warnings.warn(message, FutureWarning, stacklevel=1)
            warnings.warn("torch.distributed.nn.functional.all_gather is deprecated", FutureWarning, stacklevel=1)
            warnings.warn(deepspeed_calls[0], DeprecationWarning, stacklevel=1)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "torch.distributed.nn.functional.all_gather is deprecated"),
        (DeprecationWarning, deepspeed_calls[0]),
    ]


def _loss(gathered: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """Differs per rank, so the gather's backward must add up different gradients."""
    return (gathered * weights).sum() * (rank + 1) + 0.5 * (gathered**2).sum()


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(ROWS, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))


def _weights() -> torch.Tensor:
    return torch.randn(WORLD * ROWS, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _gather_worker(rank: int, port: int, folder: str) -> None:
    # A spawned process has Python's default warning filters (FutureWarning shown), as a launched rank has.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        setup_logging(rank)
        x = _inputs(rank).requires_grad_()
        gathered = gather_with_grad(x * 2, WORLD)
        _loss(gathered, _weights(), rank).backward()
        # The calls DeepSpeed's ZeRO makes on every step (deepspeed/comm/torch.py).
        out = torch.empty(WORLD * ROWS, DIM)
        dist.all_gather_into_tensor(out, torch.ones(ROWS, DIM))
        dist.reduce_scatter_tensor(torch.empty(ROWS, DIM), torch.ones(WORLD * ROWS, DIM))
        if rank == 0:
            warnings.warn("control: an unrelated FutureWarning", FutureWarning, stacklevel=1)
        torch.save({"gathered": gathered.detach(), "type": type(gathered).__name__, "grad": x.grad,
                    "all_gather_ok": bool((out == 1).all())}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_is_quiet_and_sums_gradients_over_ranks(tmp_path, capfd):
    capfd.readouterr()
    mp.spawn(_gather_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    out, err = capfd.readouterr()
    assert "control: an unrelated FutureWarning" in err  # the filter is narrow
    assert "all_gather" not in out + err and "reduce_scatter" not in out + err and "deprecated" not in out + err, err

    # Single-process reference: the gradient of the sum of all ranks' losses over the gathered batch.
    xs = [_inputs(r).requires_grad_() for r in range(WORLD)]
    full = torch.cat([x * 2 for x in xs])
    sum(_loss(full, _weights(), r) for r in range(WORLD)).backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["type"] == "Tensor" and result["all_gather_ok"]
        torch.testing.assert_close(result["gathered"], full.detach(), rtol=0, atol=0)
        torch.testing.assert_close(result["grad"], xs[rank].grad, rtol=1e-12, atol=1e-12)


def test_gather_with_grad_is_the_identity_on_one_rank(monkeypatch):
    x = torch.randn(2, 3, requires_grad=True)
    assert gather_with_grad(x, 1) is x
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # whatever group another test left behind
    with pytest.raises(RuntimeError, match="not initialised"):
        gather_with_grad(x, 2)


def test_quiet_startup_drops_only_the_cpu_start_up_lines(capfd, caplog):
    """DeepSpeed's per-rank "op built successfully" print and torch's "No CUDA runtime" note on a CPU host
    are dropped inside ``quiet_startup``; every other line printed or logged there still shows."""
    from mlip_dist.logging_utils import quiet_startup

    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    capfd.readouterr()
    with caplog.at_level(logging.WARNING), quiet_startup():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a line that matters", end="")
        print(" (continued)")
        cpp_extension.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        cpp_extension.warning("Error checking compiler version for c++")
        print("last line without newline", end="")
    out, _ = capfd.readouterr()
    assert out == "a line that matters (continued)\nlast line without newline"
    assert [r.getMessage() for r in caplog.records] == ["Error checking compiler version for c++"]
    assert not cpp_extension.filters
    cpp_extension.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")  # outside: shown
    assert "No CUDA runtime" in caplog.records[-1].getMessage()
