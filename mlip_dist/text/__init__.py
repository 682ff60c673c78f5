"""Report tokenization with sentence token spans (METHOD.md, Encoders: Text)."""

from mlip_dist.text.tokenize import TokenizedReports, load_tokenizer, tokenize_with_spans

__all__ = ["TokenizedReports", "load_tokenizer", "tokenize_with_spans"]
