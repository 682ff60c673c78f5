"""Fault injection (issue 6): bad inputs, numerical faults, checkpoint faults, killed ranks, security.

Every fault here is produced for real where that is possible (a truncated file, a full tmpfs, a kill -9
of a rank, a gradient that is NaN because of the data) and injected only where it cannot be (a crash in
the middle of ``save_checkpoint``). docs/RELIABILITY.md maps each fault to the test that shows it.
"""

from __future__ import annotations

import csv
import errno
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mimic_fixtures as mf  # noqa: E402
from launch_utils import REPO, free_port, launcher_env  # noqa: E402
from tiny_engines import full_exp_avg, full_params, make_engine  # noqa: E402

from mlip_dist.data.dicom import SkipReason  # noqa: E402
from mlip_dist.data.shard_writer import PackOptions, pack  # noqa: E402
from mlip_dist.training import checkpoint as ckpt  # noqa: E402

PRETRAIN = str(REPO / "mlip_dist" / "pretrain.py")


# --------------------------------------------------------------------------- bad inputs to make_shards


def _rewrite_csv_gz(path: Path, edit) -> None:
    rows = list(csv.reader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))
    header, body = rows[0], rows[1:]
    mf._write_csv_gz(path, header, edit(body))


def _good(subject: int, dicom_id: str, report=mf.REPORT_FULL) -> mf.StudySpec:
    return mf.StudySpec(subject, 50000000 + subject % 1000, "train", report, [(dicom_id, "PA", "ok8")])


@pytest.fixture(scope="module")
def hostile_release(tmp_path_factory):
    """mimic_fixtures' eight studies plus one study per remaining bad input of issue 6, point 1."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import UID

    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "root", base / "outside"
    extra = [
        mf.StudySpec(10000009, 50000009, "train", mf.REPORT_FULL, [("n-pa", "PA", "nopixels")]),
        _good(10000010, "o-pa"),  # becomes an MPEG-2 transfer syntax (no decoder exists)
        _good(10000011, "q-pa"),  # header declares 30000 x 30000
        _good(10000012, "r-pa"),  # header declares 0 rows
        _good(10000013, "s-pa", report=""),  # zero-byte report
        _good(10000014, "t-pa"),  # good; listed twice in the record list
        _good(10000015, "u-pa"),  # no row in the split CSV
        _good(10000016, "v-pa"),  # record-list path "../outside/..."
        _good(10000017, "w-pa"),  # record-list path absolute
        _good(10000018, "x-pa"),  # record-list dicom_id with "/" and ".."
        _good(10000019, "y-pa"),  # study-list report path "../outside/..."
        _good(10000020, "z-pa"),  # split "../../evil"
    ]
    mf.make_dicom_release(root, mf.default_studies() + extra)

    def rel(subject: int, dicom_id: str) -> str:
        return f"files/p{str(subject)[:2]}/p{subject}/s{50000000 + subject % 1000}/{dicom_id}.dcm"

    mpeg = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    mpeg.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    mpeg.ViewPosition = "PA"
    mpeg.save_as(root / rel(10000010, "o-pa"))
    for subject, dicom_id, rows in ((10000011, "q-pa", 30000), (10000012, "r-pa", 0)):
        ds = pydicom.dcmread(root / rel(subject, dicom_id))
        ds.Rows = rows
        if rows:
            ds.Columns = rows
        ds.save_as(root / rel(subject, dicom_id))
    # Valid inputs outside the root: packing them would prove a path escaped.
    outside.mkdir()
    for dicom_id, subject in (("v-pa", 10000016), ("w-pa", 10000017)):
        os.replace(root / rel(subject, dicom_id), outside / f"{dicom_id}.dcm")
    (outside / "report.txt").write_text(mf.REPORT_FULL)

    def edit_records(rows):
        rows = [r for r in rows]
        for r in rows:
            if r[2] == "v-pa":
                r[3] = "../outside/v-pa.dcm"
            elif r[2] == "w-pa":
                r[3] = str(outside / "w-pa.dcm")
            elif r[2] == "x-pa":
                r[2] = "x/../../x-pa"
        return rows + [[10000014, 50000014, "t-pa", "files/p10/p10000014/s50000014/u-pa.dcm"]]

    _rewrite_csv_gz(root / "cxr-record-list.csv.gz", edit_records)
    _rewrite_csv_gz(
        root / "cxr-study-list.csv.gz",
        lambda rows: [[*r[:2], "../outside/report.txt"] if r[1] == "50000019" else r for r in rows],
    )
    _rewrite_csv_gz(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        lambda rows: [[*r[:3], "../../evil"] if r[0] == "z-pa" else r for r in rows if r[0] != "u-pa"],
    )
    out = base / "shards"
    summary = pack(PackOptions(root=root, out=out, size=16, shard_size=3, progress=False, max_error_frac=1.0))
    return base, out, summary


def test_make_shards_lists_every_bad_input_and_keeps_every_good_one(hostile_release):
    base, out, summary = hostile_release
    assert dict(summary.skipped) == {
        "corrupt_dicom": 2,  # truncated file; header with 0 rows
        "empty_file": 1,
        "missing_report": 1,
        "no_findings_or_impression": 2,  # report with other sections only; zero-byte report
        "no_pixel_data": 1,
        "unsupported_transfer_syntax": 1,
        "image_too_large": 1,
        "duplicate_key": 1,
        "missing_csv_row": 1,
        "unsafe_path": 5,
    }
    assert dict(summary.warnings) == {"non_utf8_report": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_file = {e["file"]: e for e in errors}
    # Each entry names the file, the reason and a readable detail.
    expected = {
        "files/p10/p10000009/s50000009/n-pa.dcm": ("no_pixel_data", "Pixel Data"),
        "files/p10/p10000010/s50000010/o-pa.dcm": ("unsupported_transfer_syntax", "1.2.840.10008.1.2.4.100"),
        "files/p10/p10000011/s50000011/q-pa.dcm": ("image_too_large", "30000x30000"),
        "files/p10/p10000012/s50000012/r-pa.dcm": ("corrupt_dicom", "0x"),
        "files/p10/p10000013/s50000013.txt": ("no_findings_or_impression", "neither FINDINGS nor IMPRESSION"),
        "files/p10/p10000015/s50000015/u-pa.dcm": ("missing_csv_row", "split.csv"),
        "files/p10/p10000014/s50000014/u-pa.dcm": ("duplicate_key", "listed again"),
        "../outside/v-pa.dcm": ("unsafe_path", "'..'"),
        str(base / "outside" / "w-pa.dcm"): ("unsafe_path", "absolute"),
        "x/../../x-pa": ("unsafe_path", "dicom_id"),
        "../outside/report.txt": ("unsafe_path", "report path '../outside/report.txt' has a '..' component"),
        "files/p10/p10000020/s50000020/z-pa.dcm": ("unsafe_path", "'../../evil'"),
    }
    for file, (reason, detail) in expected.items():
        assert file in by_file, (file, sorted(by_file))
        assert by_file[file]["reason"] == reason and detail in by_file[file]["detail"], by_file[file]
    # The good inputs, all of them: four of the default tree, the duplicated one once.
    keys = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            names = archive.getnames()
        assert all("/" not in n and ".." not in n for n in names), names
        keys += sorted({n.split(".", 1)[0] for n in names})
    assert sorted(keys) == sorted([
        "10000001_50000001_c-pa", "10000002_50000002_d-ap", "10000003_50000003_e-pa",
        "11000007_50000007_i-pa", "10000014_50000014_t-pa",
    ])
    assert summary.packed == len(keys)
    # Nothing was written outside --out, and the outside files were never read into a shard.
    assert sorted(p.name for p in (base / "outside").iterdir()) == ["report.txt", "v-pa.dcm", "w-pa.dcm"]
    assert sorted(p.name for p in base.iterdir()) == ["outside", "root", "shards"]
    assert not (base.parent / "evil").exists() and not any(base.glob("**/*evil*"))


def test_dicom_size_limits_are_checked_from_the_header(tmp_path):
    """A header asking for more than MAX_IMAGE_PIXELS values is refused before any pixel is decoded."""
    import pydicom

    from mlip_dist.data.dicom import MAX_IMAGE_PIXELS, ImageReadError, read_dicom

    path = tmp_path / "multi.dcm"
    mf.write_dicom(path, np.zeros((64, 64), np.uint8))
    ds = pydicom.dcmread(path)
    frames = MAX_IMAGE_PIXELS // (64 * 64) + 1  # each frame is small; all frames together are too many
    ds.NumberOfFrames = frames
    ds.save_as(path)
    with pytest.raises(ImageReadError) as info:
        read_dicom(path)
    assert info.value.reason is SkipReason.IMAGE_TOO_LARGE and "multi.dcm" in str(info.value)
    assert f"{frames} frame(s)" in info.value.detail


# --------------------------------------------------------------------------- one-rank DeepSpeed engines


def batch(seed: int, poison: bool = False, nan_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    if nan_input:
        x[1, 2] = float("nan")
    return x, torch.tensor([poison])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nan_loss_and_nan_gradient_skip_the_step_without_touching_weights_or_optimizer(single_rank_group, stage):
    from mlip_dist.pretrain import StepOutcome, optimizer_step

    cpu = torch.device("cpu")
    faulty, clean = make_engine(stage), make_engine(stage)
    outcomes = []
    for engine, batches in ((faulty, [batch(1), batch(2, poison=True), batch(3, nan_input=True), batch(4)]),
                            (clean, [batch(1), batch(4)])):
        for i, b in enumerate(batches):
            before = full_params(engine)
            moments = full_exp_avg(engine) if i else None
            outcome = optimizer_step(engine, engine(b), cpu)
            if engine is faulty:
                outcomes.append(outcome)
            after = full_params(engine)
            if outcome is StepOutcome.APPLIED:
                assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
            else:
                assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), outcome
                assert all(torch.equal(a, b) for a, b in zip(moments, full_exp_avg(engine), strict=True)), outcome
    assert outcomes == [StepOutcome.APPLIED, StepOutcome.NONFINITE_GRAD, StepOutcome.NONFINITE_LOSS,
                        StepOutcome.APPLIED]
    # The skipped steps left no trace: same weights and Adam moments as a run that never saw them.
    for a, b in zip(full_params(faulty), full_params(clean), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full_exp_avg(faulty), full_exp_avg(clean), strict=True):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in full_params(faulty))


# --------------------------------------------------------------------------- checkpoint faults


def _save(engine, root: Path, step: int) -> str:
    return ckpt.save_training_checkpoint(engine, root, step, {"step": step}, {"step": step, "reason": "test"},
                                         rank=0, keep_last=3)


def _assert_resumes_from(root: Path, tag: str, expected: list[torch.Tensor]) -> None:
    """A fresh engine resumed the way pretrain.py does (and through ``latest``) gets the saved weights."""
    assert ckpt.find_latest(root) == tag
    assert (root / ckpt.LATEST_FILE).read_text() == tag
    for explicit in (tag, None):  # None: DeepSpeed reads ``latest``
        engine = make_engine(2, lr=0.3)
        path, client_state = engine.load_checkpoint(str(root), tag=explicit)
        assert path is not None and client_state["step"] == int(tag.removeprefix("step_"))
        assert all(torch.equal(a, b) for a, b in zip(full_params(engine), expected, strict=True))
    from safetensors.torch import load_file

    weights = load_file(str(root / tag / ckpt.CONSOLIDATED_WEIGHTS))
    assert torch.equal(weights["fc1.weight"], expected[0])


class Crash(BaseException):
    """Stands for the process dying (kill -9, node failure) in the middle of writing a file."""


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_in_use(single_rank_group, tmp_path, monkeypatch):
    from mlip_dist.pretrain import optimizer_step

    engine = make_engine(2)
    root = tmp_path / "checkpoints"
    optimizer_step(engine, engine(batch(1)), torch.device("cpu"))
    _save(engine, root, 2)
    saved = full_params(engine)
    optimizer_step(engine, engine(batch(2)), torch.device("cpu"))
    real_save, calls = engine.checkpoint_engine.save, []

    def save_then_die(state_dict, path):
        calls.append(path)
        real_save(state_dict, path)  # the first file lands on disk, then the process "dies"
        raise Crash(path)

    monkeypatch.setattr(engine.checkpoint_engine, "save", save_then_die)
    with pytest.raises(Crash):
        _save(engine, root, 4)
    partial = root / "step_00000004"
    assert calls and any(partial.iterdir()) and not (partial / ckpt.COMPLETE_MARKER).exists()
    _assert_resumes_from(root, "step_00000002", saved)
    # Saving the same step again later (after a resume) completes normally over the partial folder.
    monkeypatch.setattr(engine.checkpoint_engine, "save", real_save)
    _save(engine, root, 4)
    assert ckpt.find_latest(root) == "step_00000004" and (root / ckpt.LATEST_FILE).read_text() == "step_00000004"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the injected-ENOSPC case still runs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    os.sync()


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_disk_full_when_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(single_rank_group, tmp_path,
                                                                                   request, monkeypatch, how):
    from mlip_dist.pretrain import optimizer_step

    root = (request.getfixturevalue("small_tmpfs") if how == "tmpfs" else tmp_path) / "checkpoints"
    engine = make_engine(2)
    optimizer_step(engine, engine(batch(1)), torch.device("cpu"))
    _save(engine, root, 2)
    saved = full_params(engine)
    optimizer_step(engine, engine(batch(2)), torch.device("cpu"))
    if how == "tmpfs":
        _fill(root.parent)
    else:
        def no_space(state_dict, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(engine.checkpoint_engine, "save", no_space)
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        _save(engine, root, 4)
    message = str(info.value)
    assert "step_00000004" in message and "disk is full" in message
    assert f"previous complete checkpoint {root / 'step_00000002'} is intact" in message
    if how == "tmpfs":
        (root.parent / "filler").unlink()
    _assert_resumes_from(root, "step_00000002", saved)


# --------------------------------------------------------------------------- loader faults


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_loader_reads_hostile_member_names_in_memory_and_writes_nothing(tmp_path, tokenizer, monkeypatch):
    from test_loader import _png

    from mlip_dist.data.loader import AugmentConfig, Collator, ShardStream

    shard = tmp_path / "data" / "train-000000.tar"
    shard.parent.mkdir()
    names = ["../../escape", "/abs/olute", "a/b/../c"]
    with tarfile.open(shard, "w") as archive:
        for i, key in enumerate(names):
            for ext, data in (("png", _png(i)), ("json", json.dumps({"sentences": ["Heart size is normal."]}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    work = tmp_path / "work" / "deep" / "er"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # where "../../escape" would land if anything extracted members
    before = _tree(tmp_path)
    stream = ShardStream([str(shard)], rank=0, world_size=1, micro_batch_size=3, batches_per_epoch=1,
                         collate=Collator(tokenizer, 32, 4), augment=AugmentConfig(image_size=16), shuffle_buffer=1)
    first = next(iter(stream))
    assert sorted(first.keys) == sorted(names) and first.num_skipped == 0
    assert first.images.shape == (3, 3, 16, 16)
    assert _tree(tmp_path) == before  # the loader decodes in memory and never writes a file


def test_truncated_and_missing_shards_in_the_middle_of_training_are_skipped_and_named(tmp_path, tokenizer, caplog):
    from test_loader import write_shards

    from mlip_dist.data.loader import build_train_loader

    root = write_shards(tmp_path / "s", num_shards=3, per_shard=8)
    loader, per_epoch = build_train_loader(root, "train", tokenizer=tokenizer, rank=0, world_size=1,
                                           micro_batch_size=4, global_batch_size=4, image_size=16, num_workers=0,
                                           shuffle_buffer=4, augment=False)
    iterator = iter(loader)
    first_epoch = [next(iterator) for _ in range(per_epoch)]
    assert sum(b.num_skipped for b in first_epoch) == 0
    truncated, missing = root / "train-000001.tar", root / "train-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2 + 100])  # cut mid-member
    missing.unlink()
    later = [next(iterator) for _ in range(2 * per_epoch)]  # two more epochs from the damaged set
    assert all(len(b) == 4 for b in later)
    keys = {k for b in later for k in b.keys}
    assert keys and keys < {k for b in first_epoch for k in b.keys}
    assert not any(k in keys for k in (f"k{i:05d}" for i in range(16, 24)))  # the missing shard's samples
    assert "train-000001.tar" in caplog.text and "train-000002.tar" in caplog.text


# --------------------------------------------------------------------------- security


UNSAFE_CALLS = {
    "pickle.load": re.compile(r"\b(c?[Pp]ickle|dill|marshal|shelve)\.(loads?|Unpickler|open)\b"),
    "torch.load without weights_only=True": re.compile(r"\btorch\.load\((?![^)]*weights_only=True)"),
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "unsafe yaml": re.compile(r"\byaml\.(load|unsafe_load|full_load)\s*\("),
}


def test_no_unpickling_eval_or_unsafe_yaml_in_library_and_tools():
    hits = []
    for path in sorted([*(REPO / "mlip_dist").rglob("*.py"), *(REPO / "tools").rglob("*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            hits += [f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}"
                     for what, pattern in UNSAFE_CALLS.items() if pattern.search(code)]
    assert hits == []
    # The patterns do catch what they are meant to.
    assert UNSAFE_CALLS["torch.load without weights_only=True"].search("torch.load(path, map_location='cpu')")
    assert not UNSAFE_CALLS["torch.load without weights_only=True"].search("torch.load(p, weights_only=True)")
    assert UNSAFE_CALLS["eval/exec"].search("x = eval(text)") and not UNSAFE_CALLS["eval/exec"].search("model.eval()")


def test_config_text_is_data_never_code(tmp_path, monkeypatch):
    from mlip_dist.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    payload = "__import__('os').system('touch pwned')"
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  output_dir: \"{payload}\"\n")
    assert load_config(str(config), []).train.output_dir == payload  # kept as a string
    with pytest.raises(ConfigError):
        load_config(None, [f"--train.lr={payload}"])
    config.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(Exception, match="python/object"):
        load_config(str(config), [])
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- multi-process faults (slow)


def _write_config(folder: Path, shards: Path, tokenizer: str, **train) -> Path:
    from test_pretrain import write_config

    return write_config(folder, shards, tokenizer, **{"image_log_every": 0, **train})


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the trainer process with RANK=<rank> among the launcher's children."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_kill_9_of_one_rank_stops_the_job_and_resume_auto_continues(tmp_path, synthetic_shards, minilm_path):
    from test_pretrain import run, summary, torchrun

    config = _write_config(tmp_path, synthetic_shards, minilm_path, max_steps=10_000, save_every=3,
                           collective_timeout_s=60)
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        process = subprocess.Popen(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json"),
                                   cwd=REPO, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.time() + 300
        while "step 5/" not in log_path.read_text():
            assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        victim = _rank_pid(process.pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        process.wait(timeout=180)  # rank 0's next collective fails; torchrun tears the job down
        stopped_after = time.time() - killed_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert process.returncode != 0 and stopped_after < 90, (stopped_after, text[-3000:])
    checkpoints = tmp_path / "run" / "checkpoints"
    last = ckpt.find_latest(checkpoints)
    last_step = int(last.removeprefix("step_"))
    assert last_step >= 3 and last_step % 3 == 0, text[-3000:]
    assert (checkpoints / ckpt.LATEST_FILE).read_text() == last
    # Resume with the same schedule; the job continues at the saved step, none lost or repeated.
    result = run(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json",
                          "--resume", "auto", "--train.stop_at_step", str(last_step + 2)), REPO)
    assert f"resumed from {checkpoints / last} at step {last_step}" in result.stderr
    done = summary(tmp_path / "run")
    assert done["step"] == last_step + 2 and len(done["loss_history"]) == 2
    assert done["samples_seen"] == (last_step + 2) * 8

    # TensorBoard holds every step once: the steps the killed launch logged after its checkpoint are purged,
    # and every value equals an uninterrupted run's (issue 15, point 3).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight = tmp_path / "straight"
    straight.mkdir()
    straight_config = _write_config(straight, synthetic_shards, minilm_path, max_steps=10_000, save_every=3,
                                    collective_timeout_s=60)
    run(torchrun(2, "--config", str(straight_config), "--deepspeed_config", "ds_configs/zero2.json",
                 "--train.stop_at_step", str(last_step + 2)), REPO)
    resumed_events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    straight_events = EventAccumulator(str(straight / "run" / "tensorboard")).Reload()
    assert f"step {last_step + 1}/" in text  # the killed launch logged steps after its last checkpoint
    for tag in ("loss/total", "loss/global", "lr", "data/skipped_samples"):
        steps = [e.step for e in resumed_events.Scalars(tag)]
        assert steps == list(range(1, last_step + 3)), (tag, steps)
        resumed_values = [e.value for e in resumed_events.Scalars(tag)]
        straight_values = [e.value for e in straight_events.Scalars(tag)]
        assert resumed_values == pytest.approx(straight_values, rel=1e-5, abs=1e-6), tag


def _replace_first_member(shard: Path, suffix: str, data: bytes) -> str:
    """Rewrite ``shard`` with the first member ending in ``suffix`` replaced by ``data``; returns its name."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    name = next(m.name for m, _ in members if m.name.endswith(suffix))
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            payload = data if member.name == name else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return name


@pytest.mark.slow
def test_fault_counts_are_the_runs_summed_over_ranks(tmp_path, synthetic_shards, minilm_path, tokenizer):
    """Corrupt samples in two shards and a shard cut mid-member: the 2-rank run's skipped and lost samples in
    train_summary.json and TensorBoard equal the sums of a single-process loader over the same steps."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_pretrain import run, summary, torchrun

    from mlip_dist.data.loader import build_train_loader

    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    _replace_first_member(shards / "train-000000.tar", ".png", b"not an image")
    _replace_first_member(shards / "train-000003.tar", ".json", b"{not json")
    cut = shards / "train-000005.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    steps = 16  # two epochs of 8 global batches of 8
    config = _write_config(tmp_path, shards, minilm_path, max_steps=steps, save_every=steps, log_every=1,
                           eval_every=0)
    run(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json"), REPO)
    done = summary(tmp_path / "run")

    loader, _ = build_train_loader(shards, "train", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=8,
                                   global_batch_size=8, image_size=96, max_length=64, num_workers=0,
                                   shuffle_buffer=16, augment=True, seed=0)
    iterator = iter(loader)
    reference = [next(iterator) for _ in range(steps)]
    skipped = sum(b.num_skipped for b in reference)
    lost = sum(b.num_lost for b in reference)
    assert skipped >= 2 and lost >= 1, (skipped, lost)  # both kinds of fault were met
    assert (done["skipped_samples"], done["lost_samples"]) == (skipped, lost)
    assert done["shard_errors"] >= 1
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert events.Scalars("data/skipped_samples")[-1].value == skipped
    assert events.Scalars("data/lost_samples")[-1].value == lost

    # Exact resume across corrupt samples (issue 16, point 3): stopped at step 5, after corrupt samples of the
    # first epoch, and resumed: the same losses as the uninterrupted run and the same run totals.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed_config = _write_config(resumed_dir, shards, minilm_path, max_steps=steps, save_every=steps, log_every=1,
                                   eval_every=0)
    run(torchrun(2, "--config", str(resumed_config), "--deepspeed_config", "ds_configs/zero2.json",
                 "--train.stop_at_step", "5"), REPO)
    first_part = summary(resumed_dir / "run")
    assert first_part["skipped_samples"] + first_part["lost_samples"] >= 1  # faults before the resume point
    run(torchrun(2, "--config", str(resumed_config), "--deepspeed_config", "ds_configs/zero2.json"), REPO)
    resumed = summary(resumed_dir / "run")
    assert resumed["loss_history"] == pytest.approx(done["loss_history"][5:], rel=1e-5, abs=1e-6)
    assert (resumed["skipped_samples"], resumed["lost_samples"]) == (skipped, lost)


@pytest.mark.slow
def test_diverging_run_skips_non_finite_steps_then_stops_with_a_clear_message(tmp_path, synthetic_shards,
                                                                             minilm_path):
    """lr = 1e30: step 1 is finite, then every loss is NaN; the run stops after max_bad_steps, promptly."""
    from test_pretrain import torchrun

    config = _write_config(tmp_path, synthetic_shards, minilm_path, max_steps=50, save_every=100, lr=1e30,
                           warmup_steps=0, max_bad_steps=3)
    started = time.time()
    result = subprocess.run(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json"),
                            cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and time.time() - started < 150, text[-3000:]
    for step, in_a_row in ((2, 1), (3, 2), (4, 3)):
        assert f"non-finite loss at step {step} ({in_a_row} in a row): step skipped" in text
    assert "FloatingPointError: 3 steps in a row with a non-finite loss or gradient" in text
    assert "train.max_bad_steps=3" in text and "step 5/" not in text
    assert not (tmp_path / "run" / "train_summary.json").exists()


def test_gloo_collectives_time_out_when_a_peer_hangs(tmp_path):
    """The case kill -9 does not cover: a rank alive but stuck. ``collective_timeout_s`` bounds the wait."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import datetime, os, sys, time\n"
        "import torch, torch.distributed as dist\n"
        "rank = int(sys.argv[1])\n"
        "dist.init_process_group('gloo', rank=rank, world_size=2, init_method=f'tcp://127.0.0.1:{sys.argv[2]}',\n"
        "                        timeout=datetime.timedelta(seconds=3))\n"
        "if rank == 1:\n"
        "    time.sleep(60)\n"
        "started = time.time()\n"
        "try:\n"
        "    dist.all_reduce(torch.ones(1))\n"
        "except Exception as err:\n"
        "    print(f'TIMED OUT after {time.time() - started:.1f}s: {type(err).__name__}', flush=True)\n"
        "    os._exit(3)\n"
    )
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    hanging = subprocess.Popen([sys.executable, str(script), "1", port], env=env)
    try:
        result = subprocess.run([sys.executable, str(script), "0", port], env=env, capture_output=True, text=True,
                                timeout=60)
    finally:
        hanging.kill()
        hanging.wait()
    assert result.returncode == 3, result.stdout + result.stderr
    seconds = float(re.search(r"TIMED OUT after ([\d.]+)s", result.stdout).group(1))
    assert 2.5 <= seconds < 20
