#!/usr/bin/env python
"""Train a WordPiece tokenizer on the report texts of the training shards.

    python tools/train_tokenizer.py --shards shards/synthetic --out runs/tokenizer [--vocab-size 8000]

Reads the ``txt`` member of every sample in ``<shards>/<split>-*.tar`` (default split ``train``,
so validation/test text never shapes the vocabulary), trains a lower-casing BERT WordPiece model
with the ``tokenizers`` library and saves it as a transformers ``BertTokenizerFast`` folder
(``save_pretrained``), loadable with ``AutoTokenizer.from_pretrained(out)``. The folder is written
atomically (temporary folder + rename).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import BertWordPieceTokenizer
from tqdm import tqdm
from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # v5: alias of BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def iter_shard_texts(shards: list[Path]) -> Iterator[str]:
    """Yield the ``txt`` member of every sample (webdataset naming: ``<key>.<ext>``, ext after the first dot)."""
    for shard in tqdm(shards, desc="shards", unit="shard"):
        try:
            with tarfile.open(shard, "r") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    basename = member.name.rsplit("/", 1)[-1]
                    if basename.partition(".")[2] != "txt":
                        continue
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield handle.read().decode("utf-8")
        except tarfile.TarError as err:
            raise RuntimeError(f"{shard}: not a readable tar shard ({err})") from err


def train_tokenizer(
    shard_dir: Path,
    out: Path,
    vocab_size: int = 8000,
    split: str = "train",
    min_frequency: int = 2,
    overwrite: bool = False,
) -> BertTokenizerFast:
    """Train on ``<shard_dir>/<split>-*.tar`` and save a BertTokenizerFast folder at ``out``."""
    shards = sorted(shard_dir.glob(f"{split}-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no {split}-*.tar shards in {shard_dir}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    wordpiece = BertWordPieceTokenizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    num_texts = 0

    def counted() -> Iterator[str]:
        nonlocal num_texts
        for text in iter_shard_texts(shards):
            num_texts += 1
            yield text

    wordpiece.train_from_iterator(
        counted(), vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
    )
    if num_texts == 0:
        raise ValueError(f"the {split} shards in {shard_dir} contain no txt members")
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,  # the trained tokenizers.Tokenizer inside the wrapper
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"trained on {num_texts} reports from {len(shards)} shards; vocab {tokenizer.vocab_size} -> {out}")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, required=True, help="folder with <split>-*.tar shards")
    parser.add_argument("--out", type=Path, required=True, help="output tokenizer folder")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--split", default="train", help="shard split prefix (default: train)")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    train_tokenizer(args.shards, args.out, args.vocab_size, args.split, args.min_frequency, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
