"""bf16 end to end on the CPU (issue 14): the consolidated weights are the optimizer's fp32 masters at every
ZeRO stage and precision; a bf16 run trains, resumes exactly and evaluates on 2 CPU ranks."""

from __future__ import annotations

import pytest
import torch
from tiny_engines import TinyNet, full_params, make_engine, tiny_batch

from mlip_dist.training import checkpoint as ckpt


def module_state_dict_the_old_way(engine) -> dict[str, torch.Tensor]:
    """What save_consolidated_weights wrote before issue 14: the module's own parameters, cast to float."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=gather):
        return {name: tensor.detach().float().clone() for name, tensor in engine.module.state_dict().items()}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidated_weights_are_the_fp32_masters(single_rank_group, tmp_path, stage, precision):
    from safetensors.torch import load_file

    from mlip_dist.pretrain import StepOutcome, optimizer_step

    engine = make_engine(stage, lr=0.01, precision=precision)
    assert engine.bfloat16_enabled() is (precision == "bf16")
    for seed in range(3):
        assert optimizer_step(engine, engine(tiny_batch(seed)), torch.device("cpu")) is StepOutcome.APPLIED
    path = tmp_path / "model.safetensors"
    ckpt.save_consolidated_weights(engine, path, rank=0)
    saved = load_file(str(path))
    names = [name for name, _ in engine.module.named_parameters()]
    masters = dict(zip(names, full_params(engine), strict=True))
    assert sorted(saved) == sorted(masters)
    for name, master in masters.items():
        assert saved[name].dtype == torch.float32 and master.dtype == torch.float32
        assert torch.equal(saved[name], master), name  # exact: the file is the masters
    old = module_state_dict_the_old_way(engine)
    differences = max(float((old[name] - masters[name]).abs().max()) for name in names)
    if precision == "bf16":
        # The module holds bf16 copies: the old file was off by up to a bf16 rounding of the weights.
        assert differences > 1e-4, differences
        assert all(torch.equal(old[n], masters[n].bfloat16().float()) for n in names)
    else:
        assert differences == 0.0


@pytest.mark.parametrize("stage", [2, 3])
def test_a_save_after_validation_writes_the_state_validation_gathered(single_rank_group, tmp_path, monkeypatch, stage):
    """On a step that validates and saves, the fp32 masters are gathered once (for validation) and that state is
    what ``model.safetensors`` holds; a save without it gathers them itself."""
    from safetensors.torch import load_file

    from mlip_dist.pretrain import StepOutcome, optimizer_step

    engine = make_engine(stage, lr=0.01, precision="bf16")
    assert optimizer_step(engine, engine(tiny_batch(0)), torch.device("cpu")) is StepOutcome.APPLIED
    validated = ckpt.full_fp32_state_dict(engine)
    gathers = []
    original = ckpt.full_fp32_state_dict
    monkeypatch.setattr(ckpt, "full_fp32_state_dict", lambda *a, **k: gathers.append(1) or original(*a, **k))
    for step, weights, expected_gathers in ((1, validated, 0), (2, None, 1)):
        tag = ckpt.save_training_checkpoint(engine, tmp_path, step, {"step": step}, {"step": step}, rank=0,
                                            keep_last=3, weights=weights)
        assert len(gathers) == expected_gathers
        saved = load_file(str(tmp_path / tag / ckpt.CONSOLIDATED_WEIGHTS))
        assert sorted(saved) == sorted(validated)
        assert all(torch.equal(saved[name], validated[name]) for name in validated)  # the masters either way


@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_layers_keep_their_fp32_values_in_bf16(single_rank_group, tmp_path, stage):
    from safetensors.torch import load_file

    from mlip_dist.pretrain import optimizer_step

    torch.manual_seed(0)
    initial = TinyNet()  # make_engine seeds the same way
    engine = make_engine(stage, lr=0.01, precision="bf16", freeze=("fc1",))
    for seed in range(2):
        optimizer_step(engine, engine(tiny_batch(seed)), torch.device("cpu"))
    path = tmp_path / "model.safetensors"
    ckpt.save_consolidated_weights(engine, path, rank=0, frozen=engine.frozen_fp32)
    saved = load_file(str(path))
    for name in ("weight", "bias"):
        reference = getattr(initial.fc1, name).detach()
        assert torch.equal(saved[f"fc1.{name}"], reference)
        assert not torch.equal(reference.bfloat16().float(), reference)  # the bf16 module copy differs
    from deepspeed.utils import safe_get_full_fp32_param

    assert torch.equal(saved["fc2.weight"], safe_get_full_fp32_param(engine.module.fc2.weight))


def test_frozen_fp32_copies_are_taken_from_frozen_parameters_only():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    net[0].requires_grad_(False)
    copies = ckpt.frozen_fp32_copies(net)
    assert sorted(copies) == ["0.bias", "0.weight"]
    net[0].weight.data.mul_(2)
    assert not torch.equal(copies["0.weight"], net[0].weight)  # a copy, not a view


@pytest.mark.slow
def test_bf16_run_trains_resumes_exactly_and_evaluates_on_two_cpu_ranks(tmp_path, synthetic_shards, minilm_path):
    from safetensors.torch import load_file
    from test_evaluate import evaluate_in_process
    from test_pretrain import REPO, run, summary, torchrun, write_config

    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight_dir, resumed_dir):
        folder.mkdir()
    common = {"max_steps": 6, "precision": "bf16", "image_log_every": 0}
    straight_cfg = write_config(straight_dir, synthetic_shards, minilm_path, save_every=3, **common)
    result = run(torchrun(2, "--config", str(straight_cfg), "--deepspeed_config", "ds_configs/zero2.json"), REPO)
    assert "bf16=True" in result.stderr
    resumed_cfg = write_config(resumed_dir, synthetic_shards, minilm_path, save_every=100, **common)
    run(torchrun(2, "--config", str(resumed_cfg), "--deepspeed_config", "ds_configs/zero2.json",
                 "--train.stop_at_step", "3"), REPO)
    result = run(torchrun(2, "--config", str(resumed_cfg), "--deepspeed_config", "ds_configs/zero2.json"), REPO)
    assert "resumed from" in result.stderr and "bf16=True" in result.stderr
    straight = summary(straight_dir / "run")["loss_history"]
    resumed = summary(resumed_dir / "run")["loss_history"]
    assert len(straight) == 6 and len(resumed) == 3
    # The checkpoint restores the bf16 module, the fp32 masters, Adam's moments, the RNG and the data
    # position: the resumed losses are the straight run's, bit for bit on the same machine.
    assert resumed == straight[3:]

    weights = load_file(str(straight_dir / "run" / "checkpoints" / "step_00000006" / "model.safetensors"))
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert all(t.dtype == torch.float32 for t in floats)
    # fp32 masters, not bf16 copies: most trained values are not representable in bf16.
    assert sum(int((t != t.bfloat16().float()).sum()) for t in floats) > 0.5 * sum(t.numel() for t in floats)

    out = tmp_path / "eval"
    evaluate_in_process("--checkpoint", str(straight_dir / "run"), "--data", str(synthetic_shards), "--split",
                        "validate", "--task", "retrieval", "--out", str(out), "--no-progress")
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"].endswith("step_00000006")
    assert 0.0 <= results["retrieval"]["image_to_report"]["R@10"] <= 1.0
