"""The composed MLIP model: masked image encoder, report/sentence encoder, heads, MAE decoder.

``MLIPModel.forward(batch)`` returns every tensor the MLIP losses need (docs/ARCHITECTURE.md,
Model output; METHOD.md, Encoders and Losses 1-4) as an ``MLIPOutput``. Evaluation uses
``encode_image`` / ``encode_text`` (unmasked, no decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mlip_dist.config import IntegrityMode, LossConfig, ModelConfig
from mlip_dist.data.batch import MLIPBatch
from mlip_dist.losses.global_contrastive import LogitScale
from mlip_dist.losses.reconstruction import gather_patches, patchify
from mlip_dist.models.decoder import MAEDecoder
from mlip_dist.models.heads import Projection
from mlip_dist.models.image_encoder import ImageEncoder, PatchMask
from mlip_dist.models.output import MLIPOutput
from mlip_dist.models.text_encoder import TextEncoder


@dataclass
class ImageFeatures:
    """Projected, L2-normalised image features (evaluation)."""

    global_features: torch.Tensor  # (B, d)
    patch_features: torch.Tensor  # (B, Kv, d); Kv = K when unmasked
    visible_patch_idx: torch.Tensor  # (B, Kv)


@dataclass
class TextFeatures:
    """Projected, L2-normalised report and sentence features (evaluation)."""

    report_features: torch.Tensor  # (B, d)
    sentence_features: torch.Tensor  # (B, S, d); zero where sentence_mask is False
    sentence_mask: torch.Tensor  # (B, S) bool


class MLIPModel(nn.Module):
    """MLIP: masked ViT + BERT with sentence spans, four projection heads and an MAE decoder."""

    def __init__(self, config: ModelConfig, loss_config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.loss_config = loss_config if loss_config is not None else LossConfig()
        self.image_encoder = ImageEncoder(config.image)
        self.text_encoder = TextEncoder(config.text)
        d = config.embed_dim
        image_dim, text_dim = self.image_encoder.embed_dim, self.text_encoder.hidden_size
        self.image_global_proj = Projection(image_dim, d, config.projection)
        self.patch_proj = Projection(image_dim, d, config.projection)
        self.report_proj = Projection(text_dim, d, config.projection)
        self.sentence_proj = Projection(text_dim, d, config.projection)
        self.decoder = MAEDecoder(
            encoder_dim=image_dim,
            grid_size=self.image_encoder.grid_size,
            patch_size=self.image_encoder.patch_size,
            in_chans=config.image.in_chans,
            config=config.decoder,
        )
        self.logit_scale = LogitScale(self.loss_config.logit_scale_init, self.loss_config.logit_scale_max)
        if config.gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Per-block activation recomputation in the image encoder, text encoder and decoder."""
        self.image_encoder.set_gradient_checkpointing(enabled)
        self.text_encoder.set_gradient_checkpointing(enabled)
        self.decoder.set_gradient_checkpointing(enabled)

    def forward(
        self,
        batch: MLIPBatch,
        compute_full_view: bool | None = None,
        generator: torch.Generator | None = None,
        mask: PatchMask | None = None,
    ) -> MLIPOutput:
        """Everything the MLIP losses consume, for one batch (METHOD.md, Encoders; Losses 1-4).

        ``compute_full_view`` (default: ``integrity == relative``) adds a no-grad pass of the
        unmasked image with the same weights and mode (so dropout/drop-path behave as in the
        masked pass) for ``image_global_full``. ``generator``/``mask`` make the masking reproducible; without
        them the batch's ``mask_seeds`` (training loader) seed each image's mask, else the global torch RNG.
        """
        if compute_full_view is None:
            compute_full_view = IntegrityMode(self.loss_config.integrity) == IntegrityMode.RELATIVE
        seeds = getattr(batch, "mask_seeds", None) if generator is None else None  # an explicit generator wins
        image = self.image_encoder(batch.images, generator=generator, mask=mask, mask_seeds=seeds)
        text = self.text_encoder(
            batch.input_ids, batch.attention_mask, batch.sentence_spans, batch.sentence_mask
        )
        sentence_mask = batch.sentence_mask.bool()
        # Padding slots stay exactly zero after normalisation, so no loss can pick them up by accident.
        sentence_features = self.sentence_proj(text.sentence_embeddings) * sentence_mask.unsqueeze(-1)

        image_global_full = None
        if compute_full_view:
            with torch.no_grad():
                full = self.image_encoder(batch.images, mask_ratio=0.0)
                image_global_full = self.image_global_proj(full.global_embedding)

        decoded = self.decoder(
            image.patch_tokens, image.mask.visible_patch_idx, image.mask.masked_patch_idx, image.prefix_tokens
        )
        # Same row-major patch order as the decoder's indices (timm PatchEmbed order).
        target = gather_patches(
            patchify(batch.images, self.image_encoder.patch_size), decoded.masked_patch_idx
        )
        return MLIPOutput(
            image_global=self.image_global_proj(image.global_embedding),
            report_global=self.report_proj(text.global_embedding),
            patch_features=self.patch_proj(image.patch_tokens),
            visible_patch_idx=image.mask.visible_patch_idx,
            sentence_features=sentence_features,
            sentence_mask=sentence_mask,
            visibility_mask=image.mask.visibility_mask,
            logit_scale=self.logit_scale(),
            image_global_full=image_global_full,
            reconstruction=decoded.reconstruction,
            masked_patch_idx=decoded.masked_patch_idx,
            reconstruction_target=target,
        )

    def encode_image(self, images: torch.Tensor, mask_ratio: float = 0.0) -> ImageFeatures:
        """Projected global and patch features of (by default unmasked) images; no decoder."""
        encoded = self.image_encoder(images, mask_ratio=mask_ratio)
        return ImageFeatures(
            global_features=self.image_global_proj(encoded.global_embedding),
            patch_features=self.patch_proj(encoded.patch_tokens),
            visible_patch_idx=encoded.mask.visible_patch_idx,
        )

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_spans: torch.Tensor,
        sentence_mask: torch.Tensor,
    ) -> TextFeatures:
        """Projected report and sentence features; padding sentence slots are zero."""
        encoded = self.text_encoder(input_ids, attention_mask, sentence_spans, sentence_mask)
        mask = sentence_mask.bool()
        return TextFeatures(
            report_features=self.report_proj(encoded.global_embedding),
            sentence_features=self.sentence_proj(encoded.sentence_embeddings) * mask.unsqueeze(-1),
            sentence_mask=mask,
        )
