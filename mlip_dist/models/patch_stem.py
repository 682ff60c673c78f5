"""Convolutional patch stem: a small CNN that embeds each patch on its own (our addition).

The paper's ViT turns each patch into a token with one linear map (timm's ``PatchEmbed``).
``model.image.stem: conv`` replaces that map with a stack of 3x3 convolutions with batch norm and
ReLU that halve the resolution at every stage until the patch is one pixel, then a 1x1 convolution
to the embedding width (the early-convolution stem of Xiao et al., "Early Convolutions Help
Transformers See Better", 2021, applied inside each patch). Trained from scratch on a few thousand
images, a ViT learns far faster with it (docs/RESULTS.md, "Image encoder").

Each patch is convolved separately (zero padding at the patch border), so a token depends on its
own patch's pixels only: random patch masking keeps its meaning (masked pixels reach no output)
and only the visible patches are embedded (``forward_patches``). The stem's batch-norm statistics
are computed over the embedded patches of the local batch, as in DDP without SyncBatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mlip_dist.losses.reconstruction import patchify

__all__ = ["ConvPatchEmbed"]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class ConvPatchEmbed(nn.Module):
    """A timm ``embed_layer`` (same constructor and attributes as ``timm.layers.PatchEmbed``).

    For patch size p = 2^n: stage i (i = 0 .. n-1) is a stride-2 3x3 convolution to
    ``width * 2^i`` channels, followed by a stride-1 3x3 convolution on the inner stages; then a
    1x1 convolution to ``embed_dim``. ``width`` defaults to 16 (``model.image.stem_width``).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True, width: int = 16,
                 dynamic_img_pad: bool = False, **unsupported: Any) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if not isinstance(patch_size, int) and patch_size[0] != patch_size[1]:
            raise ValueError(f"conv patch stem: square patches only, got {patch_size}")
        stages = patch.bit_length() - 1
        if patch < 4 or patch != 2**stages:
            raise ValueError(f"conv patch stem: model.image.patch_size must be a power of two >= 4, got {patch}")
        if dynamic_img_pad or any(value not in (None, False) for key, value in unsupported.items()
                                  if key not in ("device", "dtype")):
            raise ValueError(f"conv patch stem: unsupported PatchEmbed options {sorted(unsupported)}")
        if size[0] % patch or size[1] % patch:
            raise ValueError(f"conv patch stem: image size {size} is not a multiple of the patch size {patch}")
        self.img_size = size
        self.patch_size = (patch, patch)
        self.grid_size = (size[0] // patch, size[1] // patch)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        layers: list[nn.Module] = []
        channels = in_chans
        for stage in range(stages):
            out_channels = width * 2**stage
            layers += _conv_bn_relu(channels, out_channels, stride=2)
            if 0 < stage < stages - 1:
                layers += _conv_bn_relu(out_channels, out_channels, stride=1)
            channels = out_channels
        layers.append(nn.Conv2d(channels, embed_dim, 1, bias=bias))
        self.net = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, k, p*p*C) patch pixels in ``patchify`` layout -> (B, k, embed_dim), each from its own patch."""
        batch, count = patches.shape[:2]
        p = self.patch_size[0]
        pixels = patches.reshape(batch * count, p, p, self.in_chans).permute(0, 3, 1, 2)
        return self.net(pixels).reshape(batch, count, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K, embed_dim) for every patch, row-major (as timm's PatchEmbed)."""
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"conv patch stem: input {tuple(images.shape[-2:])} is not {self.img_size}")
        return self.forward_patches(patchify(images, self.patch_size[0]))
