"""argparse ``type=`` helpers: every numeric command-line option declares its valid range here.

    parser.add_argument("--size", type=positive_int, default=512)
    parser.add_argument("--max-shard-bytes", type=int_range(ge=512), default=2**30)

A value outside its range, or one that is not a number, is refused while the arguments are parsed,
before any work starts (argparse prints the reason and exits with status 2), naming the option, the
value and the range: ``error: argument --size: 0 is out of range: must be >= 1``. NaN and infinities
are never in range. The ranges are ``mlip_dist.config.Range``, the declarations of the config fields.
Enumerated options use ``choices``; ``enum_option`` gives an enum's values as the choices.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable
from typing import TypeVar

from mlip_dist.config import SEED_MAX, Range

E = TypeVar("E", bound=enum.Enum)


def _checked(kind: type, valid: Range, name: str) -> Callable[[str], int | float]:
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        problem = valid.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text} is {problem}")
        return value

    parse.__name__ = name  # argparse names the type by it in its own messages
    return parse


def int_range(*, ge: int | None = None, gt: int | None = None, le: int | None = None,
              lt: int | None = None) -> Callable[[str], int]:
    """An integer option in the given range, e.g. ``int_range(ge=64)``."""
    return _checked(int, Range(ge=ge, gt=gt, le=le, lt=lt), "int_range")  # type: ignore[return-value]


def float_range(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
                lt: float | None = None) -> Callable[[str], float]:
    """A finite float option in the given range, e.g. ``float_range(gt=0.0)``."""
    return _checked(float, Range(ge=ge, gt=gt, le=le, lt=lt), "float_range")  # type: ignore[return-value]


positive_int = _checked(int, Range(ge=1), "positive_int")  # counts, sizes, epochs, workers
nonnegative_int = _checked(int, Range(ge=0), "nonnegative_int")  # ranks, counts where 0 means none
seed = _checked(int, Range(ge=0, le=SEED_MAX), "seed")  # the config's seed range (numpy's limit)
fraction = _checked(float, Range(ge=0.0, le=1.0), "fraction")  # a share of something, in [0, 1]
open_fraction = _checked(float, Range(ge=0.0, lt=1.0), "open_fraction")  # in [0, 1): leaves something over


def enum_option(kind: type[E]) -> dict:
    """``add_argument(..., **enum_option(ImageFormat))``: the enum's values as ``choices`` (listed by --help and
    in the error, ``invalid choice: 'gif' (choose from 'png', 'jpg')``); the parsed value is the member."""

    def parse(text: str) -> E | str:
        try:
            return kind(text)
        except ValueError:
            return text  # not a member: argparse's choices check refuses it, listing the values

    parse.__name__ = kind.__name__
    return {"type": parse, "choices": [member.value for member in kind]}
