"""Tokenize whole reports once and locate each sentence as a span of token positions.

METHOD.md, "Encoders" (Text): one encoder pass per report; a sentence embedding is the mean of
the token states in its span. The report text is its sentences joined with single spaces; a fast
tokenizer's offset mapping maps each sentence's character range to the tokens it contains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mlip_dist.config import TextEncoderConfig


class TokenizedReports(NamedTuple):
    """Tokenized batch of reports. Unpacks as ``(input_ids, attention_mask, sentence_spans, sentence_mask)``."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    sentence_spans: torch.Tensor  # (B, S, 2) long, token [start, end); (0, 0) for padding slots
    sentence_mask: torch.Tensor  # (B, S) bool


def load_tokenizer(config: TextEncoderConfig) -> PreTrainedTokenizerBase:
    """The fast tokenizer of ``config.tokenizer`` (default ``config.path``), from a local folder only."""
    folder = config.tokenizer or config.path
    if not folder:
        raise ValueError(
            "model.text.tokenizer and model.text.path are both unset; point one at a local tokenizer folder "
            "(e.g. one written by tools/train_tokenizer.py)"
        )
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise TypeError(f"{folder}: no fast tokenizer (tokenizer.json) available; sentence spans need one")
    if len(tokenizer) > config.vocab_size:
        # Token ids past the embedding table fail only inside the first forward (a device-side assert on GPUs).
        raise ValueError(
            f"tokenizer {folder} has {len(tokenizer)} tokens but model.text.vocab_size is {config.vocab_size}; "
            f"set --model.text.vocab_size {len(tokenizer)} (or use the tokenizer the text encoder was trained with)"
        )
    return tokenizer


def join_sentences(sentences: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Report text (sentences joined by one space) and each sentence's character range [start, end)."""
    parts: list[str] = []
    char_spans: list[tuple[int, int]] = []
    cursor = 0
    for sentence in sentences:
        if parts:
            cursor += 1  # the joining space
        parts.append(sentence)
        char_spans.append((cursor, cursor + len(sentence)))
        cursor += len(sentence)
    return " ".join(parts), char_spans


LENGTH_BUCKETS = 4


def bucket_lengths(max_length: int, buckets: int = LENGTH_BUCKETS) -> list[int]:
    """The few sequence lengths a batch is padded to: ``buckets`` steps up to ``max_length``, each a multiple
    of 8 where ``max_length`` allows (so a compiled or graph-captured encoder sees at most ``buckets`` shapes)."""
    lengths = {min(max_length, 8 * math.ceil(max_length * k / buckets / 8)) for k in range(1, buckets + 1)}
    return sorted(lengths)


def tokenize_with_spans(
    tokenizer: PreTrainedTokenizerBase,
    sentences_per_report: list[list[str]],
    max_length: int,
    max_sentences: int,
    length_buckets: int | None = LENGTH_BUCKETS,
) -> TokenizedReports:
    """Tokenize each report once (with special tokens, truncated to ``max_length``, padded to the
    longest report, then on to the next of ``bucket_lengths(max_length, length_buckets)``; None: the
    longest report's length) and return the token span of each of its first ``max_sentences`` sentences.

    Guarantees: a token belongs to the sentence whose character range contains the token's first
    character, so spans never overlap and never include special or padding tokens. A sentence cut
    off entirely by truncation (or with no tokens) gets ``sentence_mask`` False and span (0, 0); a
    sentence cut partially keeps its visible tokens. Sentences beyond ``max_sentences`` still take
    part in the report text (the global report embedding sees them) but get no span. The S axis is
    always ``max_sentences`` long so that batches from all ranks have the same shape.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; sentence spans need return_offsets_mapping"
        )
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    joined = [join_sentences(list(sentences)) for sentences in sentences_per_report]
    texts = [text for text, _ in joined]
    encoded = tokenizer(
        texts,
        max_length=max_length,
        truncation=True,
        padding="longest",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="np",
    )
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    attention = np.asarray(encoded["attention_mask"], dtype=np.int64)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64)  # (B, T, 2)
    special = np.asarray(encoded["special_tokens_mask"], dtype=bool)
    if length_buckets and input_ids.shape[1] < max_length:
        # Padding positions are masked out of attention and of both poolings: the encodings do not change.
        target = next(n for n in bucket_lengths(max_length, length_buckets) if n >= input_ids.shape[1])
        extra = ((0, 0), (0, target - input_ids.shape[1]))
        input_ids = np.pad(input_ids, extra, constant_values=tokenizer.pad_token_id or 0)
        attention = np.pad(attention, extra)
        offsets = np.pad(offsets, (*extra, (0, 0)))
        special = np.pad(special, extra, constant_values=True)
    batch = len(texts)
    spans = np.zeros((batch, max_sentences, 2), dtype=np.int64)
    mask = np.zeros((batch, max_sentences), dtype=bool)
    for b in range(batch):
        content = np.flatnonzero((attention[b] == 1) & ~special[b] & (offsets[b, :, 1] > offsets[b, :, 0]))
        ranges = np.asarray(joined[b][1][:max_sentences], dtype=np.int64).reshape(-1, 2)
        if len(content) == 0 or len(ranges) == 0:
            continue
        token_starts = offsets[b, content, 0]  # increasing along the sequence
        lo = np.searchsorted(token_starts, ranges[:, 0], side="left")
        hi = np.searchsorted(token_starts, ranges[:, 1], side="left")
        present = hi > lo
        count = len(ranges)
        spans[b, :count, 0] = np.where(present, content[np.minimum(lo, len(content) - 1)], 0)
        spans[b, :count, 1] = np.where(present, content[np.maximum(hi - 1, 0)] + 1, 0)
        mask[b, :count] = present
    return TokenizedReports(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        sentence_spans=torch.from_numpy(spans),
        sentence_mask=torch.from_numpy(mask),
    )
