"""Text encoder: a transformers BERT-style model, one pass per report, sentences as token spans.

METHOD.md, "Encoders" (Text): the whole report is tokenized once; each sentence is a span of
token positions and its embedding is the mean of its token states (one encoder pass per report,
not one per sentence). The global report embedding is the CLS state (config: mean over the
attention mask).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel
from transformers.utils import logging as hf_logging

from mlip_dist.config import GlobalPool, TextEncoderConfig

logger = logging.getLogger(__name__)


# A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of tuple outputs to re-gather
# this module's parameters for backward; it cannot see into dataclasses.
class TextEncoding(NamedTuple):
    """Encoder-width outputs for a batch of reports."""

    global_embedding: torch.Tensor  # (B, H) CLS state or attention-mask mean
    sentence_embeddings: torch.Tensor  # (B, S, H) span means; zero for padding slots
    token_states: torch.Tensor  # (B, T, H) last hidden states


def span_mean(
    token_states: torch.Tensor, sentence_spans: torch.Tensor, sentence_mask: torch.Tensor
) -> torch.Tensor:
    """Mean of token states over each ``[start, end)`` span, vectorised (no loop over sentences).

    token_states (B, T, H), sentence_spans (B, S, 2) long, sentence_mask (B, S) bool -> (B, S, H).
    Builds a (B, S, T) span-membership matrix and reduces with one ``bmm``. Slots with
    ``sentence_mask`` False or an empty span are exactly zero and carry no gradient to the tokens.
    """
    positions = torch.arange(token_states.shape[1], device=token_states.device)
    start = sentence_spans[..., 0:1]
    end = sentence_spans[..., 1:2]
    member = (positions >= start) & (positions < end) & sentence_mask.unsqueeze(-1)  # (B, S, T)
    weights = member.to(token_states.dtype)
    counts = weights.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return torch.bmm(weights / counts, token_states)


def masked_mean(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over positions with ``attention_mask`` 1. (B, T, H) -> (B, H)."""
    weights = attention_mask.to(token_states.dtype).unsqueeze(-1)
    return (token_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class _LoadReportCatcher(logging.Filter):
    """Takes transformers' weight-loading report off the log (it is kept for errors) and passes the rest."""

    # transformers 5.x: one "<Model> LOAD REPORT" table; 4.x: "Some weights of ..." paragraphs.
    _MARKERS = ("LOAD REPORT", "Some weights of")

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(marker in message for marker in self._MARKERS):
            self.reports.append(_ANSI.sub("", message))
            return False
        return True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Where transformers logs the report (modeling_utils passes its own logger; the function's default is its module's).
_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")


@contextmanager
def _quiet_load() -> Iterator[_LoadReportCatcher]:
    """Hold back what ``from_pretrained`` prints on every process: its "Loading weights" bar and its
    load-report table. :func:`_check_loading_info` checks the same information and raises or warns itself."""
    catcher = _LoadReportCatcher()
    loggers = [logging.getLogger(name) for name in _REPORT_LOGGERS]
    for log in loggers:
        log.addFilter(catcher)
    hook_set = getattr(hf_logging, "set_tqdm_hook", None)
    previous = hook_set(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True})) if hook_set else None
    try:
        yield catcher
    finally:
        if hook_set:
            hook_set(previous)
        for log in loggers:
            log.removeFilter(catcher)


def _format_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_loading_info(path: Path, model: PreTrainedModel, info: dict[str, Any], dropped_pooler: bool) -> None:
    """Raise when weights of the encoder are not in the checkpoint; warn about checkpoint weights it does not use."""
    name = type(model).__name__
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in info.get("mismatched_keys") or [])
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weights missing from the checkpoint: {_format_keys(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} weights with the wrong shape: {_format_keys(mismatched)}")
        raise RuntimeError(
            f"text encoder folder {path} does not hold weights for its {name} ({'; '.join(problems)}); they would "
            "be randomly initialised. Point model.text.path at a folder whose weights match its config.json, "
            "or leave it unset to train the text encoder from scratch"
        )
    # The pooler is dropped on purpose (add_pooling_layer=False): its checkpoint weights are expected to go unused.
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not (dropped_pooler and k.startswith("pooler.")))
    if unexpected:
        logger.warning(
            "text encoder folder %s: %d checkpoint weights are not used by %s (%s); fine for a task head, "
            "wrong if the folder should match the encoder exactly",
            path, len(unexpected), name, _format_keys(unexpected),
        )


def _load_pretrained(path: Path, dropout: float | None) -> PreTrainedModel:
    if not path.is_dir():
        raise FileNotFoundError(
            f"text encoder folder {path} does not exist; model.text.path must be a local transformers "
            "model folder (config.json + weights); nothing is downloaded"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    with _quiet_load() as catcher:
        try:
            try:
                # BERT-family models accept add_pooling_layer; the pooler is never used here.
                model, info = AutoModel.from_pretrained(str(path), add_pooling_layer=False, **kwargs)
                dropped_pooler = True
            except TypeError:
                model, info = AutoModel.from_pretrained(str(path), **kwargs)
                dropped_pooler = False
        except Exception as exc:
            if not catcher.reports:
                raise
            # transformers raises after its report ("look at the above report"): put the report in the error.
            raise RuntimeError(
                f"could not load the text encoder from {path}:\n" + "\n".join(catcher.reports) + f"\n{exc}"
            ) from exc
    _check_loading_info(path, model, info, dropped_pooler)
    return model


def build_bert_config(config: TextEncoderConfig) -> BertConfig:
    """The random-init BERT architecture described by ``config`` (used when ``path`` is None)."""
    dropout = 0.1 if config.dropout is None else config.dropout
    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=max(512, config.max_length),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


class TextEncoder(nn.Module):
    """BERT-style report encoder with sentence span pooling (METHOD.md, Encoders)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        if config.path:
            self.model = _load_pretrained(Path(config.path), config.dropout)
        else:
            self.model = BertModel(build_bert_config(config), add_pooling_layer=False)
        # An encoder keeps no key/value cache; left on, every checkpointed layer call warns that it is ignored.
        self.model.config.use_cache = False
        self.pool = GlobalPool(config.pool)
        if config.freeze_layers > 0:
            self._freeze(config.freeze_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def _freeze(self, num_layers: int) -> None:
        """Freeze the embeddings and the first ``num_layers`` transformer layers."""
        embeddings = getattr(self.model, "embeddings", None)
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if embeddings is None or layers is None:
            raise ValueError(
                f"model.text.freeze_layers: {type(self.model).__name__} has no .embeddings / .encoder.layer"
            )
        if num_layers > len(layers):
            raise ValueError(
                f"model.text.freeze_layers={num_layers} but the encoder has {len(layers)} layers"
            )
        for module in [embeddings, *list(layers)[:num_layers]]:
            for param in module.parameters():
                param.requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Per-layer activation recomputation (transformers; active in training mode)."""
        # transformers >= 5.x renamed the switch (the old name warns and goes away in v6).
        if hasattr(self.model, "activation_checkpointing_enable"):
            if enabled:
                self.model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                self.model.activation_checkpointing_disable()
        elif enabled:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_spans: torch.Tensor,
        sentence_mask: torch.Tensor,
    ) -> TextEncoding:
        """One encoder pass per report; sentence embeddings are span means of its token states."""
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pool == GlobalPool.CLS:
            global_embedding = states[:, 0]
        else:
            global_embedding = masked_mean(states, attention_mask)
        sentences = span_mean(states, sentence_spans, sentence_mask.bool())
        return TextEncoding(
            global_embedding=global_embedding, sentence_embeddings=sentences, token_states=states
        )
