"""Masked image prediction loss (METHOD.md, Losses 4).

Mean squared error between predicted and target pixels of the MASKED patches
only; with ``norm_pix`` (MAE's ``norm_pix_loss``) each target patch is first
normalised by its own mean and variance: (x - mean) / sqrt(var + 1e-6), var
the unbiased variance over the patch's pixels, as in MAE.
"""

from __future__ import annotations

import torch

from mlip_dist.distributed import all_reduce_no_grad

__all__ = ["gather_patches", "normalise_patches", "patchify", "reconstruction_loss", "unpatchify"]

_NORM_EPS = 1e-6


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, p*p*C), patches in row-major order, pixels ordered (p, p, C) as in MAE.

    K = (H / p) * (W / p); this is the patch order of a timm ViT (patch k = row k // (W/p), col k % (W/p)).
    """
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, K, p*p*C) -> (B, C, gh*p, gw*p)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, gh * patch_size, gw * patch_size)


def gather_patches(patches: torch.Tensor, patch_idx: torch.Tensor) -> torch.Tensor:
    """Select patches per image: (B, K, P), (B, Km) long -> (B, Km, P) (e.g. the masked patches' targets)."""
    return torch.gather(patches, 1, patch_idx[:, :, None].expand(-1, -1, patches.shape[-1]))


def normalise_patches(patches: torch.Tensor) -> torch.Tensor:
    """Per-patch normalisation of the last dim: (x - mean) / sqrt(var + 1e-6), unbiased var (MAE)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + _NORM_EPS).sqrt()


def reconstruction_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    norm_pix: bool = True,
    world_size: int = 1,
    group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """L_rec for this rank (METHOD.md, Losses 4), scaled so the mean over ranks is the full-batch loss.

    Args:
        prediction, target: (B, L, P) predicted and raw target pixels per patch.
        loss_mask: (B, L) bool, True for patches that count (the masked ones). None = all
            L patches count, which is the case when ``prediction`` holds masked patches only
            (``MLIPOutput.reconstruction``). Positions with False have no effect at all.
        norm_pix: normalise each target patch by its own mean/variance first.

    The loss is the mean over all counted patches of the global batch of the per-patch
    mean squared error; the counted-patch total is all-reduced, so ranks may differ in count.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"reconstruction_loss: prediction {tuple(prediction.shape)} != target {tuple(target.shape)}"
        )
    target = target.float()
    if norm_pix:
        target = normalise_patches(target)
    per_patch = (prediction.float() - target).pow(2).mean(dim=-1)  # (B, L)
    if loss_mask is None:
        loss_mask = torch.ones(per_patch.shape, dtype=torch.bool, device=per_patch.device)
    # where(), not a product: a NaN/inf predicted at an uncounted position must not leak in.
    local_sum = torch.where(loss_mask, per_patch, torch.zeros_like(per_patch)).sum()
    count = all_reduce_no_grad(loss_mask.sum().to(per_patch.dtype), world_size, group)
    return local_sum * world_size / count.clamp(min=1)
