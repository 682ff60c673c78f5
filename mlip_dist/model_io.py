"""Load a trained MLIP model from a run folder or a checkpoint folder, without unpickling.

Accepted ``--checkpoint`` forms (any ZeRO stage):
- a run folder ``runs/x`` (holds ``config.json`` and ``checkpoints/``): its latest complete checkpoint;
- a checkpoints folder ``runs/x/checkpoints``: its latest complete checkpoint;
- one tag folder ``runs/x/checkpoints/step_00000100``.
Weights come from the tag's ``model.safetensors`` (written at save time on every ZeRO stage); the config
from the run's ``config.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlip_dist.config import MLIPConfig, from_dict
from mlip_dist.training.checkpoint import BEST_FILE, CONSOLIDATED_WEIGHTS, TAG_PATTERN, find_best, find_latest

logger = logging.getLogger(__name__)


class CheckpointError(FileNotFoundError):
    pass


@dataclass
class LoadedRun:
    config: MLIPConfig
    model: Any  # MLIPModel
    loss_state: dict[str, torch.Tensor]  # learned-integrity parameters, if any
    tag_dir: Path
    run_dir: Path


SELECTIONS = ("latest", "best")  # --select of evaluate.py and export


def resolve_checkpoint(path: str | Path, select: str = "latest") -> tuple[Path, Path]:
    """(run_dir, tag_dir) for any accepted form of ``path``: a step folder, or a run or checkpoints folder
    and ``select`` (``latest`` complete checkpoint, or the ``best`` by the run's validation metric)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if TAG_PATTERN.match(path.name):
        return path.parent.parent, path
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if select == "best":
        tag = find_best(checkpoints)
        if tag is None:
            raise CheckpointError(f"{checkpoints} holds no best checkpoint (no {checkpoints / BEST_FILE} naming a "
                                  "complete one): the run never validated (train.eval_every 0?); use --select latest")
        return checkpoints.parent, checkpoints / tag
    tag = find_latest(checkpoints)
    if tag is None:
        raise CheckpointError(f"{checkpoints} holds no complete checkpoint (step_NNNNNNNN/complete.json)")
    return checkpoints.parent, checkpoints / tag


# Fields older runs' config.json files carry that are now the model's (one source of truth).
_MOVED_DATA_FIELDS = ("image_size", "max_sentences", "max_length")


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config in the current schema. Runs before the data section lost its copies of the model's
    sizes tokenised with ``data.max_length``; that value becomes ``model.text.max_length`` (the tokenisation
    length now), so evaluation and export read the reports as the run was trained on them."""
    data_section = data.get("data") or {}
    if not any(key in data_section for key in _MOVED_DATA_FIELDS):
        return data
    data = {**data, "data": {k: v for k, v in data_section.items() if k not in _MOVED_DATA_FIELDS}}
    if "max_length" in data_section:
        model = dict(data.get("model") or {})
        model["text"] = {**(model.get("text") or {}), "max_length": data_section["max_length"]}
        data["model"] = model
    return data


def load_run(path: str | Path, device: torch.device | str = "cpu", select: str = "latest") -> LoadedRun:
    """Build the model of a run from its config and load its consolidated fp32 weights (safetensors) of the
    checkpoint :func:`resolve_checkpoint` selects."""
    from safetensors.torch import load_file

    from mlip_dist.models.mlip import MLIPModel

    run_dir, tag_dir = resolve_checkpoint(path, select)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found: the run folder must hold the resolved training config")
    config = from_dict(MLIPConfig, upgrade_config(json.loads(config_path.read_text())))
    weights = tag_dir / CONSOLIDATED_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{weights} not found: the checkpoint was saved with train.save_consolidated=false; "
            "resume it for one step with save_consolidated=true to write it"
        )
    state = load_file(str(weights), device=str(device))
    # The starting weights are replaced by the checkpoint's: do not require them on this machine.
    config.model.image.checkpoint = None
    if config.model.text.path is not None and not Path(config.model.text.path).is_dir():
        logger.warning("text encoder folder %s is gone; building it from the config", config.model.text.path)
        config.model.text.path = None
    model = MLIPModel(config.model, config.loss)
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(model_state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: weights do not fit the config in {config_path}: {err}") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    loss_state = {k.removeprefix("loss."): v for k, v in state.items() if k.startswith("loss.")}
    return LoadedRun(config=config, model=model.to(device).eval(), loss_state=loss_state, tag_dir=tag_dir,
                     run_dir=run_dir)


def load_tokenizer(config: MLIPConfig) -> Any:
    """The run's fast tokenizer from its local folder (never downloaded)."""
    from mlip_dist.text.tokenize import load_tokenizer as load_text_tokenizer

    return load_text_tokenizer(config.model.text)
