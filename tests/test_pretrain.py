"""Pre-training launches on CPU: torchrun, the deepspeed launcher (1 node, --no_ssh per node, 4 loopback
"hosts" through pdsh/ssh), ZeRO-2/3, checkpoint/resume equality, SIGTERM preemption, TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from launch_utils import (
    LOOPBACK_HOSTS,
    REPO,
    free_port,
    launcher_env,
    loopback_sshd,
    missing_tools,
    write_deepspeed_env,
)

from mlip_dist.config import ConfigError

PRETRAIN = str(REPO / "mlip_dist" / "pretrain.py")


def write_config(tmp_path: Path, shards: Path, tokenizer: str, **train) -> Path:
    config = {
        "preset": "tiny",
        "model": {"text": {"tokenizer": tokenizer}},
        "data": {"shards": str(shards), "num_workers": 1, "shuffle_buffer": 16, "augment": True},
        "train": {"output_dir": str(tmp_path / "run"), "global_batch_size": 8, "max_steps": 6, "warmup_steps": 2,
                  "save_every": 3, "log_every": 1, "image_log_every": 3, "lr": 1e-3, **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env or launcher_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), PRETRAIN, *args]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "train_summary.json").read_text())


def test_invalid_config_fails_before_any_process_group(tmp_path):
    from mlip_dist.pretrain import main

    with pytest.raises(ConfigError, match="train.lrr"):
        main(["--train.lrr", "1"])
    env = launcher_env()
    started = time.time()
    result = subprocess.run([sys.executable, PRETRAIN, "--loss.integrity", "sometimes"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "loss.integrity" in result.stderr
    assert time.time() - started < 60


def test_deepspeed_settings_are_refused_before_any_process_group(tmp_path, monkeypatch):
    """The DeepSpeed config is built before launch: a batch that does not split over the launched ranks
    and a ZeRO stage that contradicts ds_configs/ are errors naming both values; nothing is written."""
    import mlip_dist.pretrain
    from mlip_dist.pretrain import main

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(mlip_dist.pretrain, "RunContext", no_process_group)
    out = tmp_path / "run"
    base = ["--preset", "tiny", "--train.output_dir", str(out), "--train.global_batch_size", "8"]
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"global_batch_size \(8\) is not divisible by the world size \(3\)"):
        main([*base, "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.zero_stage = 3 contradicts zero_optimization.stage = 2"):
        main([*base, "--train.zero_stage", "3", "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")])
    assert not out.exists()
    # Shards that cannot be reached fail before launch too, naming the URL (issue 19).
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(OSError, match=r"http://127\.0\.0\.1:1/dataset\.json"):
        main([*base, "--data.shards", "http://127.0.0.1:1/", "--data.fetch_retries", "0",
              "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")])
    assert not out.exists()


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, synthetic_shards, minilm_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight_dir, resumed_dir):
        folder.mkdir()
    straight_cfg = write_config(straight_dir, synthetic_shards, minilm_path, max_steps=6, save_every=3)
    run(torchrun(2, "--config", str(straight_cfg), "--deepspeed_config", "ds_configs/zero2.json"), REPO)
    resumed_cfg = write_config(resumed_dir, synthetic_shards, minilm_path, max_steps=6, save_every=100)
    run(torchrun(2, "--config", str(resumed_cfg), "--deepspeed_config", "ds_configs/zero2.json",
                 "--train.stop_at_step", "3"), REPO)
    result = run(torchrun(2, "--config", str(resumed_cfg), "--deepspeed_config", "ds_configs/zero2.json",
                          "--resume", "auto"), REPO)
    assert "resumed from" in result.stderr
    straight = summary(straight_dir / "run")["loss_history"]
    resumed = summary(resumed_dir / "run")["loss_history"]
    assert len(straight) == 6 and len(resumed) == 3
    assert summary(resumed_dir / "run")["first_step"] == 3 and summary(straight_dir / "run")["first_step"] == 0
    # Same data, masks, augmentation and optimizer state: equal up to float32 reduction-order noise.
    assert resumed == pytest.approx(straight[3:], rel=1e-5, abs=1e-6)
    # Launching a finished run again trains nothing and keeps the summary of the launch that trained.
    before = (straight_dir / "run" / "train_summary.json").read_text()
    run(torchrun(2, "--config", str(straight_cfg), "--deepspeed_config", "ds_configs/zero2.json"), REPO)
    assert (straight_dir / "run" / "train_summary.json").read_text() == before

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_dir / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss/total", "loss/global", "loss/local", "loss/reconstruction", "lr", "logit_scale",
                "integrity/mean", "ot/iterations", "ot/marginal_error", "throughput/samples_per_s",
                "time/data_wait_s", "time/forward_s", "time/backward_step_s", "memory/peak_gib"):
        assert tag in scalars, tag
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx(straight)
    assert any(tag.startswith("ot_heatmap/") for tag in events.Tags()["images"])
    assert json.loads((straight_dir / "run" / "config.json").read_text())["train"]["max_steps"] == 6


@pytest.mark.slow
def test_learned_integrity_trains_under_deepspeed(tmp_path, synthetic_shards, minilm_path):
    """The learned-integrity parameters (METHOD.md, Losses 2) live in the loss module inside the engine:
    DeepSpeed must broadcast them, AdamW must move them, and the consolidated weights must hold them."""
    from safetensors.torch import load_file

    config = write_config(tmp_path, synthetic_shards, minilm_path, max_steps=4, save_every=4, image_log_every=0)
    run(torchrun(1, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json",
                 "--loss.integrity", "learned"), REPO)
    assert len(summary(tmp_path / "run")["loss_history"]) == 4
    weights = load_file(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors")
    learned = {name: tensor for name, tensor in weights.items() if "learned_integrity" in name}
    assert {name.rsplit(".", 1)[-1] for name in learned} == {"weight", "bias"}, sorted(learned)
    weight = next(tensor for name, tensor in learned.items() if name.endswith("weight"))
    assert float(weight.abs().max()) > 0  # initialised to zeros; 4 AdamW steps at lr 1e-3 move it


@pytest.mark.slow
def test_zero3_with_the_deepspeed_launcher_learns(tmp_path, synthetic_shards, minilm_path):
    config = write_config(tmp_path, synthetic_shards, minilm_path, max_steps=30, save_every=30, zero_stage=3,
                          lr=2e-3, warmup_steps=3, image_log_every=0)
    env = launcher_env()
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN, "--config", str(config),
         "--deepspeed_config", "ds_configs/zero3.json"], REPO, env)
    history = summary(tmp_path / "run")["loss_history"]
    assert len(history) == 30
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < first - 0.1, history
    tags = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert tags == ["step_00000030"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, synthetic_shards, minilm_path):
    config = write_config(tmp_path, synthetic_shards, minilm_path, max_steps=10_000, save_every=10_000,
                          image_log_every=0)
    log = open(tmp_path / "log.txt", "w")
    process = subprocess.Popen(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json"),
                               cwd=REPO, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.time() + 300
    while "step 3/" not in (tmp_path / "log.txt").read_text():
        assert process.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)  # what a scheduler does on preemption: every process of the job
    process.wait(timeout=120)
    text = (tmp_path / "log.txt").read_text()
    assert "stopped by signal" in text, text[-3000:]
    from mlip_dist.training.checkpoint import complete_tags

    tags = complete_tags(tmp_path / "run" / "checkpoints")
    assert tags, text[-3000:]
    saved_step = tags[-1][0]
    marker = json.loads((tmp_path / "run" / "checkpoints" / tags[-1][1] / "complete.json").read_text())
    assert marker["reason"] == "signal"
    result = run(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json",
                          "--train.max_steps", str(saved_step + 2)), REPO)
    assert f"at step {saved_step}" in result.stderr
    assert summary(tmp_path / "run")["step"] == saved_step + 2


@pytest.mark.slow
def test_no_ssh_one_launcher_per_node(tmp_path, synthetic_shards, minilm_path):
    config = write_config(tmp_path, synthetic_shards, minilm_path, max_steps=3, image_log_every=0)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port = free_port()
    env = launcher_env()
    processes = [
        subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                          "--master_addr", "127.0.0.1", "--master_port", str(port), PRETRAIN, "--config", str(config),
                          "--deepspeed_config", "ds_configs/zero2.json"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 ranks" in outputs[0]
    assert summary(tmp_path / "run")["step"] == 3


@pytest.mark.slow
def test_four_node_launch_through_pdsh_and_ssh(tmp_path, synthetic_shards, minilm_path):
    missing = missing_tools("pdsh", "sshd", "ssh-keygen")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install pdsh openssh-server)")
    config = write_config(tmp_path, synthetic_shards, minilm_path, max_steps=3, zero_stage=3, image_log_every=0)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in LOOPBACK_HOSTS))
    env = launcher_env()
    with loopback_sshd(tmp_path / "ssh") as ssh_env:
        env.update(ssh_env)
        write_deepspeed_env(tmp_path, env)
        result = run(["deepspeed", "--num_nodes", "4", "--hostfile", str(hostfile), "--no_ssh_check",
                      "--master_addr", "127.0.0.1", "--master_port", str(free_port()), PRETRAIN,
                      "--config", str(config), "--deepspeed_config", str(REPO / "ds_configs" / "zero3.json")],
                     tmp_path, env)
    assert "4 ranks" in result.stdout + result.stderr
    assert summary(tmp_path / "run")["step"] == 3
    assert len(summary(tmp_path / "run")["loss_history"]) == 3


@pytest.mark.slow
def test_resume_on_another_world_size_continues_the_same_run(tmp_path, synthetic_shards, minilm_path):
    """2 ranks -> 1 and 1 -> 2 at the same global batch: the global sample order does not depend on the ranks,
    the ZeRO state is repartitioned through DeepSpeed's universal checkpoint, and the final weights equal an
    uninterrupted 2-rank run's up to floating-point reduction order (the tiny preset has no dropout)."""
    from safetensors.torch import load_file

    def final_weights(run_dir: Path) -> dict:
        return load_file(str(run_dir / "checkpoints" / "step_00000006" / "model.safetensors"))

    runs = {}
    for name, first, second in (("straight", 2, None), ("shrink", 2, 1), ("grow", 1, 2)):
        folder = tmp_path / name
        folder.mkdir()
        cfg = write_config(folder, synthetic_shards, minilm_path, max_steps=6, save_every=3, image_log_every=0,
                           eval_every=0)
        run(torchrun(first, "--config", str(cfg), *([] if second is None else ["--train.stop_at_step", "3"])), REPO)
        if second is not None:
            result = run(torchrun(second, "--config", str(cfg)), REPO)
            assert f"resumed from {folder / 'run' / 'checkpoints' / 'step_00000003'}" in result.stderr
            assert f"world_size {first} -> {second}" in result.stderr  # the log says what changed
            assert (folder / "run" / "checkpoints" / "universal" / "step_00000003").is_dir()
        runs[name] = folder / "run"
    straight = final_weights(runs["straight"])
    straight_losses = summary(runs["straight"])["loss_history"]
    for name in ("shrink", "grow"):
        resumed = final_weights(runs[name])
        assert sorted(resumed) == sorted(straight)
        for key, value in straight.items():
            # Reduction order differs between layouts; Adam divides each gradient by its own running RMS, so an
            # element whose gradient is near eps (1e-8) can move by a few percent of one step's lr (1e-3) more or
            # less: atol is 5 % of one step. Wrong data or a lost state moves every weight by steps, not by that.
            difference = (resumed[key] - value).abs().max().item()
            assert torch.allclose(resumed[key], value, rtol=1e-4, atol=5e-5), (name, key, difference)
        assert summary(runs[name])["loss_history"] == pytest.approx(straight_losses[3:], rel=1e-4), name


def test_a_change_that_cannot_continue_exactly_is_refused_with_what_to_do():
    from mlip_dist.pretrain import refuse_silent_redeal
    from mlip_dist.training.state import DataLayout

    saved = DataLayout(world_size=2, num_workers=2, global_batch_size=8, steps_per_epoch=8)
    refuse_silent_redeal(saved, DataLayout(world_size=1, num_workers=0, global_batch_size=8, steps_per_epoch=8))
    with pytest.raises(SystemExit, match="global_batch_size 8 -> 16.*resume with train.global_batch_size 8"):
        refuse_silent_redeal(saved, DataLayout(world_size=2, num_workers=2, global_batch_size=16, steps_per_epoch=4))
    with pytest.raises(SystemExit, match="steps_per_epoch 8 -> 9"):
        refuse_silent_redeal(saved, DataLayout(world_size=2, num_workers=2, global_batch_size=8, steps_per_epoch=9))
