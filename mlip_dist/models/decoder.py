"""Light MAE-style decoder for masked image prediction (METHOD.md, Losses 4).

It sees the encoded visible tokens (projected to the decoder width) plus a learned mask token at
every masked position, adds a decoder position embedding (fixed 2-D sin-cos or learned), runs
``depth`` timm ``Block``s and predicts ``patch_size**2 * in_chans`` pixels for the masked patches
only. Patch indices are row-major over the patch grid, as timm's ``PatchEmbed`` flattens them, and
the pixel order inside a patch is ``(row, col, channel)`` (see ``patchify``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlip_dist.config import DecoderConfig, PositionEmbedding


# A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of tuple outputs to re-gather
# this module's parameters for backward; it cannot see into dataclasses.
class DecoderOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, Km, P) predicted pixels of the masked patches
    masked_patch_idx: torch.Tensor  # (B, Km) long, row-major patch indices


class MAEDecoder(nn.Module):
    """Predicts the pixels of masked patches from the encoded visible ones."""

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        config: DecoderConfig,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(encoder_dim, config.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.width))
        # A learned offset tells the decoder which tokens are prefix (CLS/register) tokens.
        self.prefix_pos = nn.Parameter(torch.zeros(1, 1, config.width))
        kind = PositionEmbedding(config.pos_embed)
        if kind == PositionEmbedding.SINCOS:
            pos = build_sincos2d_pos_embed(list(grid_size), dim=config.width).unsqueeze(0)
            self.register_buffer("pos_embed", pos, persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, config.width))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim=config.width, num_heads=config.num_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        self.pred = nn.Linear(config.width, patch_size * patch_size * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        self.grad_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def forward(
        self,
        visible_tokens: torch.Tensor,
        visible_patch_idx: torch.Tensor,
        masked_patch_idx: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """visible_tokens (B, Kv, D_enc) at ``visible_patch_idx`` -> pixels of ``masked_patch_idx``.

        Guarantees: output (B, Km, P) in the order of ``masked_patch_idx``; the visible and masked
        indices must partition the K patches of each image.
        """
        batch, _, _ = visible_tokens.shape
        embedded = self.embed(visible_tokens)
        width = embedded.shape[-1]
        full = self.mask_token.to(embedded.dtype).expand(batch, self.num_patches, width)
        full = full.scatter(1, visible_patch_idx.unsqueeze(-1).expand(-1, -1, width), embedded)
        full = full + self.pos_embed.to(embedded.dtype)
        n_prefix = 0
        if prefix_tokens is not None and prefix_tokens.shape[1] > 0:
            n_prefix = prefix_tokens.shape[1]
            full = torch.cat([self.embed(prefix_tokens) + self.prefix_pos, full], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                full = checkpoint(block, full, use_reentrant=False)
            else:
                full = block(full)
        patches = full[:, n_prefix:]
        # Predict only the masked patches: the loss ignores the visible ones (METHOD.md, Losses 4).
        masked = torch.gather(patches, 1, masked_patch_idx.unsqueeze(-1).expand(-1, -1, width))
        return DecoderOutput(reconstruction=self.pred(self.norm(masked)), masked_patch_idx=masked_patch_idx)
