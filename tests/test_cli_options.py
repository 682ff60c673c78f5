"""Issue 15, point 4: every numeric option of the command-line tools has a valid range (mlip_dist.cli_types);
an out-of-range or non-numeric value is refused while the arguments are parsed (exit status 2), with a message
naming the option, the value and the range, before anything is read or written."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import load_tool

from mlip_dist.cli_types import (
    enum_option,
    float_range,
    fraction,
    int_range,
    nonnegative_int,
    positive_int,
    seed,
)
from mlip_dist.config import Precision


def _evaluate_main() -> Callable:
    from mlip_dist import evaluate

    return evaluate.main


def _export_main() -> Callable:
    from mlip_dist import export

    return export.main


# command: (its main(argv), the arguments of a run that writes to OUT; OUT and IN are replaced by tmp paths)
COMMANDS: dict[str, tuple[Callable[[], Callable], list[str]]] = {
    "evaluate": (_evaluate_main, ["--checkpoint", "IN", "--data", "IN", "--out", "OUT"]),
    "export": (_export_main, ["--checkpoint", "IN", "--out", "OUT"]),
    "make_shards": (lambda: load_tool("make_shards").main, ["--root", "IN", "--out", "OUT", "--no-progress"]),
    "make_eval_shards": (lambda: load_tool("make_eval_shards").main, ["--benchmark", "rsna", "--root", "IN", "--out", "OUT"]),
    "make_synthetic": (lambda: load_tool("make_synthetic").main, ["--out", "OUT", "--studies", "4", "--no-progress"]),
}

RANGE = "out of range: must be"
# (command, extra arguments, what the message must say besides the option name)
CASES = [
    ("evaluate", ["--batch-size", "0"], f"0 is {RANGE} >= 1"),
    ("evaluate", ["--batch-size", "-8"], f"-8 is {RANGE} >= 1"),
    ("evaluate", ["--batch-size", "abc"], "'abc' is not an integer"),
    ("evaluate", ["--seg-epochs", "0"], f"0 is {RANGE} >= 1"),
    ("evaluate", ["--seg-epochs", "1.5"], "'1.5' is not an integer"),
    ("evaluate", ["--seed", "-1"], f"-1 is {RANGE} in [0, 4294967295]"),
    ("evaluate", ["--local_rank", "-1"], f"-1 is {RANGE} >= 0"),
    ("evaluate", ["--task", "everything"], "invalid choice: 'everything'"),
    ("export", ["--checkpoint"], "expected one argument"),  # export has no numeric option; a bad one still exits 2
    ("make_shards", ["--size", "0"], f"0 is {RANGE} >= 1"),
    ("make_shards", ["--size", "-512"], f"-512 is {RANGE} >= 1"),
    ("make_shards", ["--workers", "0"], f"0 is {RANGE} >= 1"),
    ("make_shards", ["--workers", "two"], "'two' is not an integer"),
    ("make_shards", ["--shard-size", "0"], f"0 is {RANGE} >= 1"),
    ("make_shards", ["--max-shard-bytes", "100"], f"100 is {RANGE} >= 10240"),
    ("make_shards", ["--limit", "0"], f"0 is {RANGE} >= 1"),
    ("make_shards", ["--max-sentences", "-1"], f"-1 is {RANGE} >= 1"),
    ("make_shards", ["--max-error-frac", "1.5"], f"1.5 is {RANGE} a finite number in [0, 1]"),
    ("make_shards", ["--max-error-frac", "nan"], f"nan is {RANGE} a finite number in [0, 1]"),
    ("make_shards", ["--max-error-frac", "lots"], "'lots' is not a number"),
    ("make_shards", ["--bit-depth", "12"], "invalid choice: 12"),
    ("make_shards", ["--image-format", "gif"], "invalid choice: 'gif' (choose from 'png', 'jpg')"),
    ("make_eval_shards", ["--size", "0"], f"0 is {RANGE} >= 1"),
    ("make_eval_shards", ["--per-class", "-3"], f"-3 is {RANGE} >= 1"),
    ("make_eval_shards", ["--shard-size", "x"], "'x' is not an integer"),
    ("make_eval_shards", ["--seed", "-2"], f"-2 is {RANGE} in [0, 4294967295]"),
    ("make_eval_shards", ["--fractions", "0.5", "0.6", "-0.1"], f"-0.1 is {RANGE} a finite number in [0, 1]"),
    ("make_eval_shards", ["--fractions", "0.5", "0.25", "0.5"], "0.5 0.25 0.5 must sum to 1"),
    ("make_eval_shards", ["--benchmark", "mnist"], "invalid choice: 'mnist'"),
    ("make_synthetic", ["--studies", "0"], f"0 is {RANGE} >= 1"),
    ("make_synthetic", ["--studies", "many"], "'many' is not an integer"),
    ("make_synthetic", ["--image-size", "32"], f"32 is {RANGE} >= 64"),
    ("make_synthetic", ["--workers", "0"], f"0 is {RANGE} >= 1"),
    ("make_synthetic", ["--eval-images", "-1"], f"-1 is {RANGE} >= 1"),
    ("make_synthetic", ["--val-fraction", "1"], f"1 is {RANGE} a finite number in [0, 1)"),
    ("make_synthetic", ["--test-fraction", "-0.2"], f"-0.2 is {RANGE} a finite number in [0, 1)"),
    ("make_synthetic", ["--seed", "-1"], f"-1 is {RANGE} in [0, 4294967295]"),
]


def _option(extra: list[str]) -> str:
    return extra[0].split("=")[0]


@pytest.mark.parametrize("command, extra, says", CASES, ids=[f"{c}{''.join(e)}" for c, e, _ in CASES])
def test_bad_option_exits_2_naming_option_value_and_range_and_writes_nothing(tmp_path, capsys, command, extra, says):
    make_main, base = COMMANDS[command]
    main = make_main()
    out, source = tmp_path / "out", tmp_path / "in"
    source.mkdir()
    argv = [str(out) if a == "OUT" else str(source) if a == "IN" else a for a in base] + extra
    try:
        status = main(argv)  # make_synthetic.main returns argparse's status; the others let it exit
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"argument {_option(extra)}" in err and says in err, err
    assert not out.exists()
    assert list(source.iterdir()) == []


def test_helpers_accept_the_bounds_and_refuse_just_outside():
    assert positive_int("1") == 1 and nonnegative_int("0") == 0 and seed("4294967295") == 2**32 - 1
    assert fraction("0") == 0.0 and fraction("1") == 1.0
    assert int_range(ge=64)("64") == 64 and float_range(gt=0.0)("1e-9") == 1e-9
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", **enum_option(Precision), default=Precision.AUTO)
    assert parser.parse_args(["--precision", "bf16"]).precision is Precision.BF16
    for parse, text in ((positive_int, "0"), (nonnegative_int, "-1"), (seed, "4294967296"), (fraction, "1.0001"),
                        (fraction, "inf"), (float_range(gt=0.0), "0"), (int_range(ge=64), "63"), (positive_int, "")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_every_numeric_option_of_the_tools_declares_a_range():
    """No plain type=int / type=float is left in the parsers of these commands, except with choices (a new
    numeric option needs a cli_types range)."""
    repo = Path(__file__).resolve().parent.parent
    plain = re.compile(r"type=(int|float)\b")
    for path in ("mlip_dist/evaluate.py", "mlip_dist/export.py", "tools/make_shards.py", "tools/make_eval_shards.py",
                 "tools/make_synthetic.py"):
        for number, line in enumerate((repo / path).read_text().splitlines(), 1):
            if plain.search(line):
                assert "choices=" in line, f"{path}:{number}: a numeric option without a declared range: {line.strip()}"
