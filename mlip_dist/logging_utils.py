"""Rank-aware logging: every rank logs warnings, only rank 0 logs info unless asked.

:func:`setup_logging` also turns off the library messages a user cannot act on (see
:func:`quiet_library_warnings`). Elsewhere: transformers' weight-loading bar and load-report table
are held back where the text encoder is loaded (``models/text_encoder.py``, which checks the loaded
keys itself and raises or warns on a checkpoint that does not match).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout

# torch 2.14 deprecated these collectives; DeepSpeed's communication layer (deepspeed/comm/torch.py)
# still calls them on every ZeRO step, and each rank prints the FutureWarning. Nothing in this project
# calls them (mlip_dist/distributed.py uses the functional collectives), so the user cannot act on it.
# The pattern names only these functions; torch's other FutureWarnings stay visible.
DEEPSPEED_COLLECTIVE_DEPRECATIONS = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|_reduce_scatter_base)`"
    r" is (deprecated|a private function)"
)


def quiet_library_warnings() -> None:
    """Ignore the warnings raised inside libraries that a user of this project cannot act on (idempotent)."""
    warnings.filterwarnings("ignore", message=DEEPSPEED_COLLECTIVE_DEPRECATIONS, category=FutureWarning)


# What each rank prints while ``deepspeed.init_distributed`` loads DeepSpeed's shared-memory op on a CPU
# host: DeepSpeed's print (deepspeed/comm/torch.py, build_shm_op) and torch's note that the host has
# no CUDA runtime (torch/utils/cpp_extension.py, logged when the op builder first imports it).
_STARTUP_PRINT = re.compile(r"DeepSpeed \S+ built successfully\s*")
_STARTUP_LOGS = {"torch.utils.cpp_extension": re.compile(r"No CUDA runtime is found")}


class _DropLines(io.TextIOBase):
    """A text stream that passes every line to ``stream`` except those ``pattern`` matches whole."""

    def __init__(self, stream: io.TextIOBase, pattern: re.Pattern[str]):
        super().__init__()
        self.stream, self.pattern, self.pending = stream, pattern, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not self.pattern.fullmatch(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_pending(self) -> None:
        if self.pending and not self.pattern.fullmatch(self.pending):
            self.stream.write(self.pending)
        self.pending = ""
        self.flush()


class _DropRecords(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextmanager
def quiet_startup() -> Iterator[None]:
    """Wrap ``deepspeed.init_distributed``: drop the start-up lines every rank prints on a CPU host that
    say nothing a user can act on (see ``_STARTUP_PRINT``/``_STARTUP_LOGS``). Anything else printed or
    logged inside passes, line by line."""
    filters = [(logging.getLogger(name), _DropRecords(pattern)) for name, pattern in _STARTUP_LOGS.items()]
    for log, record_filter in filters:
        log.addFilter(record_filter)
    stream = _DropLines(sys.stdout, _STARTUP_PRINT)
    try:
        with redirect_stdout(stream):
            yield
    finally:
        stream.close_pending()
        for log, record_filter in filters:
            log.removeFilter(record_filter)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int | None = None, level: int = logging.INFO, all_ranks: bool = False) -> None:
    """Configure the root logger with the rank in every line, and quiet library warnings nobody can act on."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, all_ranks))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_library_warnings()
