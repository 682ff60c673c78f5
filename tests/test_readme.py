"""Every command and config in README.md runs as written (issue 14, point 4).

The README's bash blocks are read as a shell would join them (line continuations), each command's
arguments are parsed by the parser of the program it runs, and every pre-training recipe's DeepSpeed
config is built from the README's YAML and the ``ds_configs/*.json`` it names, at the world size its
launcher starts. A recipe that could not start fails here, not on a user's cluster.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO, load_tool

from mlip_dist.config import load_config
from mlip_dist.training.ds_config import build_deepspeed_config

README = (REPO / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    """Every command line of the README's bash blocks, continuations joined, comments and heredocs dropped."""
    lines = []
    for block in code_blocks("bash"):
        block = re.sub(r"<<\s*(\w+)\n.*?\n\1\n", "\n", block, flags=re.S)  # heredoc bodies
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def hostfile_slots() -> int:
    """Slots in the README's hostfile heredoc (all hosts)."""
    (body,) = re.findall(r"cat > hostfile <<\s*EOF\n(.*?)\nEOF", README, flags=re.S)
    return sum(int(n) for n in re.findall(r"slots=(\d+)", body))


def launched_world_size(launcher: list[str]) -> int:
    """Ranks a launcher command starts: deepspeed over the hostfile, torchrun nnodes x nproc_per_node."""
    def option(name: str, default: int) -> int:
        return int(launcher[launcher.index(name) + 1]) if name in launcher else default

    if "deepspeed" in launcher:
        return hostfile_slots() if "--hostfile" in launcher else option("--num_gpus", 1)
    if "torchrun" in launcher:
        return option("--nnodes", 1) * option("--nproc_per_node", 1)
    return 1


def split_program(command: str) -> tuple[list[str], str, list[str]]:
    """(launcher tokens, program, program arguments) of one command line."""
    tokens = shlex.split(command)
    for i, token in enumerate(tokens):
        if token.endswith(".py"):
            return tokens[:i], token, tokens[i + 1:]
        if token == "-m":
            return tokens[:i], tokens[i + 1], tokens[i + 2:]
    return tokens, "", []


PARSERS = {
    "tools/make_shards.py": lambda argv: load_tool("make_shards").parse_args(argv),
    "tools/make_eval_shards.py": lambda argv: load_tool("make_eval_shards").parse_args(argv),
    "tools/make_synthetic.py": lambda argv: load_tool("make_synthetic").parse_args(argv),
    "mlip_dist/evaluate.py": lambda argv: __import__("mlip_dist.evaluate", fromlist=["x"]).parse_args(argv),
    "mlip_dist.export": lambda argv: __import__("mlip_dist.export", fromlist=["x"]).parse_args(argv),
    "mlip_dist/pretrain.py": lambda argv: __import__("mlip_dist.pretrain", fromlist=["x"]).parse_args(argv),
}
NOT_PYTHON = ("make", "bash", "cat")


def test_the_readme_has_the_recipes_this_test_reads():
    programs = [split_program(c)[1] for c in commands()]
    assert programs.count("mlip_dist/pretrain.py") >= 3  # ssh launcher, one launcher per node, SLURM
    assert set(PARSERS) <= set(programs)
    assert len(code_blocks("yaml")) == 1


@pytest.mark.parametrize("command", commands())
def test_every_readme_command_parses(command):
    launcher, program, argv = split_program(command)
    if not program:
        assert launcher[0] in NOT_PYTHON, command
        if launcher[0] == "bash":
            assert (REPO / launcher[1]).is_file(), command
        return
    assert program in PARSERS, f"README runs {program}, which this test does not know how to parse"
    if program.endswith(".py"):
        assert (REPO / program).is_file(), command
    PARSERS[program](argv)  # argparse exits 2 on an unknown or malformed option


def pretrain_recipes() -> list[str]:
    return [c for c in commands() if split_program(c)[1] == "mlip_dist/pretrain.py"]


@pytest.mark.parametrize("command", pretrain_recipes())
def test_every_pretraining_recipe_builds_its_deepspeed_config(command, tmp_path):
    from mlip_dist.pretrain import parse_args

    launcher, _, argv = split_program(command)
    args, overrides = parse_args(argv)
    (config_yaml,) = code_blocks("yaml")
    config_path = tmp_path / Path(args.config).name
    config_path.write_text(config_yaml)
    config = load_config(config_path, overrides)
    world = launched_world_size(launcher)
    assert world == 32, command  # 4 nodes x 8 GPUs in every recipe
    ds_config = build_deepspeed_config(REPO / args.deepspeed_config, config.train, world, bf16_supported=True)
    assert ds_config["train_batch_size"] == config.train.global_batch_size
    assert ds_config["train_micro_batch_size_per_gpu"] * world == config.train.global_batch_size
    shipped = yaml.safe_load((REPO / args.deepspeed_config).read_text())
    assert ds_config["zero_optimization"]["stage"] == shipped["zero_optimization"]["stage"]
    assert ds_config["bf16"]["enabled"] is True


@pytest.mark.parametrize("layout", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_the_readme_config_works_with_every_shipped_layout(layout, tmp_path):
    (config_yaml,) = code_blocks("yaml")
    config_path = tmp_path / "paper.yaml"
    config_path.write_text(config_yaml)
    config = load_config(config_path)
    ds_config = build_deepspeed_config(REPO / "ds_configs" / layout, config.train, 32, bf16_supported=True)
    assert ds_config["zero_optimization"]["stage"] == int(layout[4])
