"""Rank-aware logging: every rank logs warnings, only rank 0 logs info unless asked."""

from __future__ import annotations

import logging
import os
import sys


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int | None = None, level: int = logging.INFO, all_ranks: bool = False) -> None:
    """Configure the root logger with the rank in every line."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, all_ranks))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
