"""A `tiny` MLIP model overfits a handful of real synthetic pairs: every loss term falls clearly."""

from __future__ import annotations

import json

import torch

from mlip_dist.config import LossConfig
from mlip_dist.data.loader import (
    AugmentConfig,
    Collator,
    decode_sample,
    iterate_tar_samples,
    read_dataset_info,
)
from mlip_dist.models.presets import tiny
from mlip_dist.text.tokenize import load_tokenizer
from mlip_dist.training.module import MLIPTrainingModule


def test_tiny_model_overfits_a_handful_of_pairs(synthetic_shards, minilm_path):
    torch.manual_seed(0)
    model_config = tiny()
    model_config.text.tokenizer = minilm_path
    tokenizer = load_tokenizer(model_config.text)
    augment = AugmentConfig(image_size=model_config.image.image_size, in_chans=3, enabled=False)
    samples = []
    for raw in iterate_tar_samples(read_dataset_info(synthetic_shards, "train").shards[0], lambda s, e: None):
        if len(json.loads(raw["json"])["sentences"]) >= 2:
            samples.append(decode_sample(raw, augment, None))
        if len(samples) == 8:
            break
    batch = Collator(tokenizer, 64, model_config.max_sentences)(samples)
    module = MLIPTrainingModule(model_config, LossConfig(), rank=0, world_size=1)
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3, weight_decay=0.0)
    history = []
    for _ in range(250):
        loss, terms = module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in (("global", terms.global_loss), ("local", terms.local_loss),
                                                          ("reconstruction", terms.reconstruction_loss))})

    def mean(term: str, part: slice) -> float:
        values = [h[term] for h in history[part]]
        return sum(values) / len(values)

    for term, factor in (("global", 0.3), ("local", 0.5), ("reconstruction", 0.8)):
        start, end = mean(term, slice(0, 10)), mean(term, slice(-10, None))
        assert end < factor * start, f"{term}: {start:.3f} -> {end:.3f}"
