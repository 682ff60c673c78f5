"""Validation during training (issue 16): the validation loss terms, retrieval Recall@K both ways and
zero-shot AUC on the first ``train.eval_max_samples`` samples of the validate split, over all ranks.

The model validated is a plain fp32 copy built from the optimizer's masters (``full_fp32_state_dict``): the
weights that the checkpoint of this step holds in ``model.safetensors``. So the metrics are exactly what
``evaluate.py --max-samples N`` reports for that checkpoint, whatever the precision and ZeRO stage (ZeRO-3
partitions never have to be gathered forward by forward, and every rank may hold a different number of
samples). Scores: METHOD.md, Evaluation (global zero-shot score and Recall@K).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mlip_dist.config import MLIPConfig
from mlip_dist.data import remote

logger = logging.getLogger(__name__)

# Metric names (TensorBoard tags); train.best_metric is one of them.
RETRIEVAL_METRICS = {f"val/{short}_R@{k}": (direction, k) for short, direction in
                     (("i2r", "image_to_report"), ("r2i", "report_to_image")) for k in (1, 5, 10)}
LOSS_TERMS = ("loss/total", "loss/global", "loss/local", "loss/reconstruction")
ZERO_SHOT_METRIC = "val/zero_shot_auc"


def lower_is_better(metric: str) -> bool:
    return metric.startswith("val/loss")


class Validator:
    """Collective: every rank calls :meth:`run` at the same steps."""

    def __init__(self, config: MLIPConfig, tokenizer: Any, device: torch.device, rank: int, world_size: int):
        from mlip_dist.data.loader import AugmentConfig, Collator
        from mlip_dist.evaluation.benchmarks import load_prompts
        from mlip_dist.evaluation.tasks import classes_for
        from mlip_dist.training.module import MLIPTrainingModule

        self.config, self.tokenizer, self.device = config, tokenizer, device
        self.rank, self.world_size = rank, world_size
        # An fp32 single-rank copy of the training module (its loss computes with this rank's batches alone);
        # :meth:`run` loads the engine's master weights into it.
        self.module = MLIPTrainingModule(config.model, config.loss, rank=0, world_size=1).to(device)
        prompts = load_prompts(None)
        info = json.loads(remote.read_text(remote.join(config.data.shards, "dataset.json")))
        _, self.classes = classes_for(info, prompts)
        self.prompts = {c: prompts[c] for c in self.classes if c in prompts}
        self.augment = AugmentConfig(image_size=config.model.image.image_size, in_chans=config.model.image.in_chans,
                                     enabled=False)
        self.collate = Collator(tokenizer, config.model.text.max_length, config.model.max_sentences)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
        self.module.eval()

    @torch.no_grad()
    def run(self, state: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Metrics of the weights ``state`` (:func:`full_fp32_state_dict` of the engine) at ``step``."""
        from mlip_dist.evaluation import tasks
        from mlip_dist.evaluation.extract import extract_features, gather_features

        self.load(state)
        cfg = self.config
        model = self.module.model
        features = gather_features(extract_features(
            model, self.tokenizer, cfg.data.shards, cfg.data.val_split, image_size=cfg.model.image.image_size,
            in_chans=cfg.model.image.in_chans, max_length=cfg.model.text.max_length,
            max_sentences=cfg.model.max_sentences, batch_size=self.micro_batch(), rank=self.rank,
            world_size=self.world_size, with_patches=False, device=self.device, progress=False,
            max_samples=cfg.train.eval_max_samples), self.world_size)
        metrics: dict[str, float] = {"val/samples": float(len(features))}
        recalls = tasks.retrieval(features)
        if "skipped" not in recalls:
            for name, (direction, k) in RETRIEVAL_METRICS.items():
                metrics[name] = float(recalls[direction][f"R@{k}"])
        prompt_features = tasks.encode_prompts(model, self.tokenizer, self.prompts, cfg.model.text.max_length,
                                               self.device)
        zero_shot = tasks.zero_shot_binary(features, prompt_features, self.classes,
                                           logit_scale=float(model.logit_scale()),
                                           local_temperature=cfg.loss.local_temperature,
                                           eps=cfg.loss.ot_epsilon, max_iter=cfg.loss.ot_max_iter, tol=cfg.loss.ot_tol)
        if "mean_auc_global" in zero_shot:
            metrics[ZERO_SHOT_METRIC] = float(zero_shot["mean_auc_global"])
        metrics.update(self.loss_terms(step))
        return metrics

    def micro_batch(self) -> int:
        from mlip_dist.training.ds_config import resolve_micro_batch

        return resolve_micro_batch(self.config.train, self.world_size)

    def loss_terms(self, step: int) -> dict[str, float]:
        """Mean loss terms over this rank's micro-batches of the validation subset, averaged over all ranks by
        batch. Masking and every other random draw use a fixed seed, so two validations of the same weights
        give the same numbers. The contrastive batch is one rank's micro-batch (the loss runs per rank)."""
        from mlip_dist.data.loader import decode_sample
        from mlip_dist.evaluation.extract import iterate_split

        cfg = self.config
        sums = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64)
        raw = iterate_split(cfg.data.shards, cfg.data.val_split, self.rank, self.world_size,
                            cfg.train.eval_max_samples)
        decoded = []
        for sample in raw:
            try:
                decoded.append(decode_sample(sample, self.augment, generator=None))
            except ValueError:
                continue
        size = self.micro_batch()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for index, start in enumerate(range(0, len(decoded) - size + 1, size)):
                torch.manual_seed(cfg.train.seed * 1_000_003 + index * 7919 + self.rank)
                batch = self.collate(decoded[start:start + size]).to(self.device)
                _, terms = self.module(batch)
                values = terms.scalars()
                sums[:-1] += torch.tensor([values[name] for name in LOSS_TERMS], dtype=torch.float64)
                sums[-1] += 1
        if dist.is_initialized():
            dist.all_reduce(sums)
        if sums[-1] == 0:
            return {}
        return {f"val/{name}": float(total / sums[-1]) for name, total in zip(LOSS_TERMS, sums[:-1], strict=True)}


def best_improved(metric: str, value: float, best: float | None) -> bool:
    if best is None or np.isnan(best):
        return not np.isnan(value)
    return value < best if lower_is_better(metric) else value > best

