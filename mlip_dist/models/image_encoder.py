"""Image encoder: a timm Vision Transformer with MAE/FLIP-style random patch masking.

METHOD.md, "Encoders" (Image): each image keeps ``round(K * (1 - mask_ratio))`` of its K patches,
chosen at random per image, so every image in a batch keeps the same count and no padding is
needed. Only the visible patches go through the transformer blocks. Outputs are a global
embedding (CLS or mean of the visible tokens) and the visible patch tokens with their indices.

We reuse the timm model's own parameters (``patch_embed``, ``cls_token``, ``reg_token``,
``pos_embed``, ``blocks``, ``norm``) and only replace its ``forward_features`` so that any timm ViT
(and any timm checkpoint) plugs in. With ``mask_ratio == 0`` the result equals timm's
``forward_features`` (tested).
"""

from __future__ import annotations

import pickle  # only for its UnpicklingError; nothing is unpickled outside weights_only
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlip_dist.config import GlobalPool, ImageEncoderConfig, PatchStem
from mlip_dist.losses.reconstruction import gather_patches, patchify
from mlip_dist.models.patch_stem import ConvPatchEmbed

# Keys of a timm checkpoint that belong to a classification head we never build (num_classes=0).
_HEAD_PREFIXES = ("head.", "fc_norm.", "attn_pool.", "head_drop.")


@dataclass
class PatchMask:
    """Which patches of each image are visible. Both index tensors are sorted ascending per row."""

    visible_patch_idx: torch.Tensor  # (B, Kv) long
    masked_patch_idx: torch.Tensor  # (B, Km) long
    num_patches: int

    @property
    def visibility_mask(self) -> torch.Tensor:
        """(B, K) bool, True where a patch is visible."""
        batch = self.visible_patch_idx.shape[0]
        mask = torch.zeros(batch, self.num_patches, dtype=torch.bool, device=self.visible_patch_idx.device)
        return mask.scatter(1, self.visible_patch_idx, True)


# A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of tuple outputs to re-gather
# this module's parameters for backward; it cannot see into dataclasses.
class ImageEncoding(NamedTuple):
    """Encoder-width outputs of one (possibly masked) view."""

    global_embedding: torch.Tensor  # (B, D) CLS token or mean of visible patch tokens
    patch_tokens: torch.Tensor  # (B, Kv, D) visible patch tokens after the final norm
    prefix_tokens: torch.Tensor  # (B, Np, D) CLS (+ register) tokens after the final norm; Np may be 0
    mask: PatchMask


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: ``round(K * (1 - mask_ratio))``, at least one (METHOD.md, Encoders)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, min(num_patches, round(num_patches * (1.0 - mask_ratio))))


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> PatchMask:
    """Draw an independent random subset of patches per image (MAE: argsort of uniform noise).

    Guarantees: every row keeps exactly ``num_visible_patches(K, mask_ratio)`` distinct patches,
    visible and masked indices partition ``range(K)`` and are sorted ascending (so ``mask_ratio=0``
    keeps timm's token order). Pass ``generator`` for reproducible masks, or ``seeds`` (one per image):
    then each row's noise comes from its own seed alone, whatever else is in the batch.
    """
    keep = num_visible_patches(num_patches, mask_ratio)
    if seeds is not None:
        rows = [torch.rand(num_patches, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds.tolist()]
        noise = torch.stack(rows)
    else:
        noise_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device)
    order = torch.argsort(noise.to(device), dim=1)
    visible = order[:, :keep].sort(dim=1).values
    masked = order[:, keep:].sort(dim=1).values
    return PatchMask(visible_patch_idx=visible, masked_patch_idx=masked, num_patches=num_patches)


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, K, D), index (B, k) -> (B, k, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def load_timm_checkpoint(model: VisionTransformer, path: str | Path) -> None:
    """Load a local timm ViT checkpoint into ``model`` (never downloads).

    Accepts ``.safetensors`` or a torch file read with ``weights_only=True``; unwraps ``model`` /
    ``state_dict`` / ``module.`` wrappers; resizes the position embedding and the patch embedding
    to the model's grid with timm's ``checkpoint_filter_fn``; adapts the input channel count
    (e.g. RGB weights into a 1-channel model) with timm's ``adapt_input_conv``. Classification-head
    keys are dropped; every other key must match (strict), else a RuntimeError names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image encoder checkpoint {path} does not exist (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            raise RuntimeError(f"{path}: cannot be read as a weights-only torch checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state dict, got {type(state).__name__}")
    for wrapper in ("model", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    weight = state.get("patch_embed.proj.weight")
    target = model.patch_embed.proj.weight
    if weight is not None and weight.ndim == 4 and weight.shape[1] != target.shape[1]:
        from timm.models._manipulate import adapt_input_conv

        state["patch_embed.proj.weight"] = adapt_input_conv(target.shape[1], weight)
    state = checkpoint_filter_fn(state, model)
    state = {key: value for key, value in state.items() if not key.startswith(_HEAD_PREFIXES)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path}: does not fit the configured ViT ({err})") from err


class ImageEncoder(nn.Module):
    """timm ViT that encodes only the visible patches of each image (METHOD.md, Encoders)."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        self.config = config
        overrides: dict[str, Any] = {}
        if config.width is not None:
            overrides["embed_dim"] = config.width
        if config.depth is not None:
            overrides["depth"] = config.depth
        if config.num_heads is not None:
            overrides["num_heads"] = config.num_heads
        if config.stem == PatchStem.CONV:
            overrides["embed_layer"] = partial(ConvPatchEmbed, width=config.stem_width)
        # global_pool="" keeps the final norm on all tokens and builds no unused pooling parameters.
        vit = timm.create_model(
            config.name,
            pretrained=False,
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            num_classes=0,
            global_pool="",
            drop_path_rate=config.drop_path_rate,
            **overrides,
        )
        if not isinstance(vit, VisionTransformer):
            raise TypeError(
                f"model.image.name={config.name!r} builds a {type(vit).__name__}; "
                "the masked image encoder needs a timm VisionTransformer"
            )
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError(f"model.image.name={config.name!r}: dynamic_img_size ViTs are not supported")
        if config.pool == GlobalPool.CLS and vit.cls_token is None:
            raise ValueError(
                f"model.image.name={config.name!r} has no class token; set model.image.pool=mean"
            )
        self.vit = vit
        self.pool = GlobalPool(config.pool)
        self.grad_checkpointing = False
        if config.checkpoint:
            load_timm_checkpoint(vit, config.checkpoint)
        self._register_zero3_external_parameters()

    def _register_zero3_external_parameters(self) -> None:
        """Tell DeepSpeed ZeRO-3 that ``forward`` reads the ViT's own tokens and position embedding.

        ``forward`` uses ``vit.cls_token`` / ``reg_token`` / ``pos_embed`` without calling
        ``vit.forward``, so ZeRO-3's per-module gathering would leave them partitioned. Registering
        them as external parameters of this module makes ZeRO-3 gather them around our forward.
        Only done when DeepSpeed is already imported (training code imports it before building
        the model); the model itself never imports DeepSpeed.
        """
        deepspeed = sys.modules.get("deepspeed")
        if deepspeed is None:
            return
        for param in (self.vit.cls_token, self.vit.reg_token, self.vit.pos_embed):
            if isinstance(param, nn.Parameter):
                deepspeed.zero.register_external_parameter(self, param)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return int(self.vit.patch_embed.num_patches)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block in backward instead of storing its activations."""
        self.grad_checkpointing = enabled

    def _prefix_and_visible_patches(
        self, images: torch.Tensor, visible_patch_idx: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Visible patch tokens (B, Kv, D) with their position embedding, and the prefix tokens with theirs.

        timm's linear patch embedding embeds every patch and keeps the visible ones (the same
        result); the conv stem embeds only the visible patches' pixels.
        """
        vit = self.vit
        if isinstance(vit.patch_embed, ConvPatchEmbed):
            pixels = gather_patches(patchify(images, self.patch_size), visible_patch_idx)
            patches = vit.patch_embed.forward_patches(pixels)
        else:
            patches = _gather_tokens(vit.patch_embed(images), visible_patch_idx)  # row-major patch order
        batch = patches.shape[0]
        prefix_parts = []
        if vit.cls_token is not None:
            prefix_parts.append(vit.cls_token.expand(batch, -1, -1))
        if vit.reg_token is not None:
            prefix_parts.append(vit.reg_token.expand(batch, -1, -1))
        prefix = torch.cat(prefix_parts, dim=1) if prefix_parts else None
        if vit.pos_embed is not None:
            n_prefix = 0 if vit.no_embed_class else self.num_prefix_tokens
            # deit-3 style (no_embed_class): the position embedding covers patches only; original ViT:
            # its first num_prefix_tokens entries belong to the prefix tokens.
            patch_pos = vit.pos_embed[:, n_prefix:].expand(batch, -1, -1)
            patches = patches + _gather_tokens(patch_pos, visible_patch_idx)
            if prefix is not None and n_prefix:
                prefix = prefix + vit.pos_embed[:, :n_prefix]
        return prefix, patches

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        mask: PatchMask | None = None,
        mask_seeds: torch.Tensor | None = None,
    ) -> ImageEncoding:
        """Encode the visible patches of ``images`` (B, C, H, W).

        ``mask_ratio`` defaults to the config's; ``mask`` (e.g. from ``random_patch_mask``) fixes
        the visible patches explicitly; ``mask_seeds`` (one per image) draws each image's mask from its seed. Masked patches never reach the transformer blocks, so
        their pixels cannot influence any output.
        """
        batch = images.shape[0]
        if mask is None:
            ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
            mask = random_patch_mask(
                batch, self.num_patches, ratio, device=images.device, generator=generator, seeds=mask_seeds
            )
        prefix, tokens = self._prefix_and_visible_patches(images, mask.visible_patch_idx)
        if prefix is not None:
            tokens = torch.cat([prefix, tokens], dim=1)
        # timm's patch_drop is skipped on purpose: the random masking above replaces it.
        tokens = self.vit.norm_pre(self.vit.pos_drop(tokens))
        for block in self.vit.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        tokens = self.vit.norm(tokens)
        n_prefix = self.num_prefix_tokens
        prefix_tokens, patch_tokens = tokens[:, :n_prefix], tokens[:, n_prefix:]
        if self.pool == GlobalPool.CLS:
            global_embedding = tokens[:, 0]
        else:
            global_embedding = patch_tokens.mean(dim=1)
        return ImageEncoding(
            global_embedding=global_embedding,
            patch_tokens=patch_tokens,
            prefix_tokens=prefix_tokens,
            mask=mask,
        )
