"""DeepSpeed config builder, LR schedule and checkpoint bookkeeping (single process)."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from mlip_dist.config import ConfigError, TrainConfig, ZeroStage
from mlip_dist.training import checkpoint as ckpt
from mlip_dist.training.ds_config import build_deepspeed_config, resolve_micro_batch
from mlip_dist.training.schedule import cosine_with_warmup

DS_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"


@pytest.mark.parametrize("name, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_ds_templates_filled_from_train_config(name, stage):
    train = TrainConfig(global_batch_size=32, grad_clip=0.5, lr=3e-4, zero_stage=ZeroStage(stage), precision="bf16")
    config = build_deepspeed_config(DS_CONFIGS / f"{name}.json", train, world_size=4, bf16_supported=False)
    assert config["train_batch_size"] == 32
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage"] == stage
    assert "optimizer" not in config  # training.engine.build_optimizer builds it from train.*
    assert "auto" not in json.dumps(config)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_ds_template_optimizer_or_scheduler_block_is_refused(block):
    template = json.loads((DS_CONFIGS / "zero2.json").read_text())
    template[block] = {"type": "AdamW", "params": {"lr": 1e-2}}
    with pytest.raises(ConfigError, match=f"'{block}' block.*train"):
        build_deepspeed_config(template, TrainConfig(), world_size=1, bf16_supported=False)


def test_fused_adamw_matches_the_reference_update():
    """build_optimizer's fused AdamW takes the same steps as torch's single-tensor reference implementation
    (weight decay on one group, a scaled lr on the other), to float rounding."""
    from mlip_dist.training.engine import build_optimizer

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s) for s in shapes]
    train = TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95)

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = make([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0,
                                                                        "lr": 2e-3}])
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        return optimizer, params

    fused, got = run(lambda groups: build_optimizer(groups, train))
    assert all(group["fused"] for group in fused.param_groups)
    _, want = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                                   foreach=False))
    for g, w, s in zip(got, want, start, strict=True):
        assert not torch.equal(w, s)
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    plain, _ = run(lambda groups: build_optimizer(groups, TrainConfig(fused_adamw=False)))
    assert not any(group["fused"] for group in plain.param_groups)  # train.fused_adamw off: the single-tensor loop


def test_ds_template_stage_must_agree_with_train_config():
    train = TrainConfig(zero_stage=ZeroStage.ZERO2)
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_deepspeed_config(DS_CONFIGS / "zero3.json", train, world_size=1, bf16_supported=False)


def test_gradient_accumulation_is_refused():
    with pytest.raises(ConfigError, match="negatives"):
        resolve_micro_batch(TrainConfig(global_batch_size=64, micro_batch_size=8), world_size=2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_deepspeed_config({"gradient_accumulation_steps": 4}, TrainConfig(), 1, False)


def test_precision_auto_follows_hardware():
    train = TrainConfig(precision="auto", global_batch_size=4)
    assert build_deepspeed_config({}, train, 1, bf16_supported=True)["bf16"]["enabled"] is True
    assert build_deepspeed_config({}, train, 1, bf16_supported=False)["bf16"]["enabled"] is False


def test_cosine_schedule_shape():
    kwargs = dict(warmup_steps=10, max_steps=110, base_lr=1.0, min_lr=0.1)
    lrs = [cosine_with_warmup(s, **kwargs) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def _fake_checkpoint(root: Path, step: int, complete: bool) -> None:
    folder = root / ckpt.tag_for_step(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.mark_complete(root, ckpt.tag_for_step(step), {"step": step})


def test_latest_ignores_partial_checkpoints_and_prune_keeps_last(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step, complete=True)
    _fake_checkpoint(tmp_path, 40, complete=False)  # a crash in the middle of saving
    assert ckpt.find_latest(tmp_path) == "step_00000030"
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert removed == ["step_00000010"]
    assert [t for _, t in ckpt.complete_tags(tmp_path)] == ["step_00000020", "step_00000030"]
    assert (tmp_path / "step_00000040").is_dir()  # newer partial save left alone


def test_rng_state_round_trip_with_weights_only(tmp_path):
    (tmp_path / "t").mkdir()
    torch.manual_seed(123)
    ckpt.save_rng(tmp_path, "t", rank=0)
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    torch.manual_seed(999)
    assert ckpt.load_rng(tmp_path, "t", rank=0)
    got = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    ckpt.atomic_write_text(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_encoder_lr_scales_reach_each_parameter(single_rank_group):
    """train.{image,text}_encoder_lr_scale: DeepSpeed's optimizer holds one lr per group, the schedule keeps the
    ratio, and the first AdamW step (|update| = lr per element when weight decay is 0) moves each encoder by
    its own lr and the heads by train.lr."""
    from mlip_dist.config import MLIPConfig
    from mlip_dist.models.presets import tiny
    from mlip_dist.training.ds_config import build_deepspeed_config
    from mlip_dist.training.engine import build_engine
    from mlip_dist.training.module import MLIPTrainingModule, parameter_groups

    train = TrainConfig(global_batch_size=4, lr=1e-3, warmup_steps=0, max_steps=10, weight_decay=0.0,
                        image_encoder_lr_scale=0.5, text_encoder_lr_scale=0.1)
    config = MLIPConfig(model=tiny(), train=train)
    ds = build_deepspeed_config(DS_CONFIGS / "zero2.json", train, world_size=1, bf16_supported=False)
    engine, scheduler, _ = build_engine(config, ds, rank=0, world_size=1)
    # ZeRO-2 holds flat fp32 partitions per group, so the groups are told apart by their lr: heads with and
    # without weight decay, then each encoder's two.
    assert sorted(g["lr"] for g in engine.optimizer.param_groups) == pytest.approx([1e-4, 1e-4, 5e-4, 5e-4, 1e-3, 1e-3])
    assert all(g["fused"] for g in engine.optimizer.optimizer.param_groups)  # the client optimizer, under ZeRO-2
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # the logged lr is the heads' (group 0)
    with warnings.catch_warnings():  # torch warns that no optimizer step came first; only the schedule matters here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    ratios = sorted({round(g["lr"] / engine.optimizer.param_groups[0]["lr"], 6) for g in engine.optimizer.param_groups})
    assert ratios == [0.1, 0.5, 1.0]

    torch.manual_seed(0)
    module = MLIPTrainingModule(tiny(), config.loss, rank=0, world_size=1)
    groups = parameter_groups(module, 0.0, lr=1e-3, lr_scales={"model.text_encoder.": 0.1, "model.image_encoder.": 0.5})
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0, eps=1e-12)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for name, param in module.named_parameters():
        want = 1e-4 if name.startswith("model.text_encoder.") else 5e-4 if name.startswith("model.image_encoder.") else 1e-3
        assert (before[name] - param.detach()).abs().max().item() == pytest.approx(want, rel=1e-2), name


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_steps_with_the_fused_client_optimizer(single_rank_group, stage):
    """train.offload: the fused AdamW steps ZeRO's fp32 partitions on the CPU and lands where the same engine
    without offload does (three steps, tiny model)."""
    from tiny_engines import full_params, make_engine, tiny_batch

    from mlip_dist.pretrain import StepOutcome, optimizer_step

    results = []
    for offload in (False, True):
        engine = make_engine(stage, lr=0.01, offload=offload)
        assert engine.optimizer.optimizer.param_groups[0]["fused"]
        start = full_params(engine)
        for seed in range(3):
            assert optimizer_step(engine, engine(tiny_batch(seed)), torch.device("cpu")) is StepOutcome.APPLIED
        results.append(full_params(engine))
        assert all(not torch.equal(a, b) for a, b in zip(start, results[-1], strict=True))
    for plain, offloaded in zip(*results, strict=True):
        torch.testing.assert_close(offloaded, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("saved_fused, run_fused", [(False, True), (True, False)])
def test_resume_takes_the_runs_adamw_implementation_not_the_checkpoints(single_rank_group, tmp_path, saved_fused,
                                                                         run_fused):
    """torch's load_state_dict copies the saved groups' ``fused`` flag; Checkpointer.restore sets this run's
    train.fused_adamw again, moves the step counters where that implementation keeps them, and the next step
    lands where the saving engine's own next step does (the maths is the same)."""
    from tiny_engines import full_params, make_engine, tiny_batch

    from mlip_dist.pretrain import StepOutcome, optimizer_step
    from mlip_dist.training.checkpointer import Checkpointer
    from mlip_dist.training.engine import apply_adamw_implementation

    saver = make_engine(2, lr=0.01)
    apply_adamw_implementation(saver, saved_fused)
    for seed in range(2):
        assert optimizer_step(saver, saver(tiny_batch(seed)), torch.device("cpu")) is StepOutcome.APPLIED
    saver.save_checkpoint(str(tmp_path), tag="t", client_state={"step": 2, "samples_seen": 8})
    assert optimizer_step(saver, saver(tiny_batch(2)), torch.device("cpu")) is StepOutcome.APPLIED
    want = full_params(saver)

    resumed = make_engine(2, lr=0.01)
    state, layout = Checkpointer(resumed, tmp_path, rank=0, train=TrainConfig(fused_adamw=run_fused),
                                 frozen={}).restore("t")
    assert (state.step, layout) == (2, None)
    inner = resumed.optimizer.optimizer
    assert all(bool(group["fused"]) is run_fused for group in inner.param_groups)
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 2.0 for s in inner.state.values())
    assert optimizer_step(resumed, resumed(tiny_batch(2)), torch.device("cpu")) is StepOutcome.APPLIED
    for got, expected in zip(full_params(resumed), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
