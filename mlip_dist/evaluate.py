"""Distributed evaluation of a pre-trained MLIP checkpoint (METHOD.md, Evaluation).

    python mlip_dist/evaluate.py --checkpoint runs/x --task all --data shards/synthetic
    torchrun --nproc_per_node 2 mlip_dist/evaluate.py --checkpoint runs/x --task zero_shot --data shards/rsna
    deepspeed --num_gpus 8 mlip_dist/evaluate.py ...

Every rank extracts frozen features of its share of the shards; the features are gathered (sorted by
key) so every metric is computed from the same data whatever the world size; rank 0 writes
``results.json``, ``results.md``, TensorBoard scalars and PNGs into ``--out`` (default
``<run>/eval/<data name>``). Reads checkpoints of any ZeRO stage through their ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from mlip_dist.cli_types import nonnegative_int, positive_int, seed
from mlip_dist.logging_utils import setup_logging
from mlip_dist.model_io import SELECTIONS

logger = logging.getLogger("mlip_dist.evaluate")
TASKS = ("zero_shot", "retrieval", "linear_probe", "segmentation", "grounding")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder or one step_N folder")
    parser.add_argument("--select", choices=SELECTIONS, default="latest",
                        help="with a run or checkpoints folder: its latest complete checkpoint or the best by the "
                        "run's validation metric (train.best_metric)")
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="evaluate the first N samples of the split in dataset.json order (what validation "
                        "during training reads with train.eval_max_samples N)")
    parser.add_argument("--data", required=True, help="shard folder with dataset.json (make_shards or make_eval_shards)")
    parser.add_argument("--task", default="all", choices=(*TASKS, "all"))
    parser.add_argument("--out", help="output folder (default <run>/eval/<data folder name>)")
    parser.add_argument("--split", default="test", help="evaluation split")
    parser.add_argument("--train-split", default="train", help="split for the few-shot tasks")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--seg-epochs", type=positive_int, default=60)
    parser.add_argument("--seg-finetune", action="store_true",
                        help="fine-tune a copy of the image encoder with the segmentation head (default: frozen)")
    parser.add_argument("--prompts", help="prompt sets JSON (default: mlip_dist/resources/prompts.json)")
    parser.add_argument("--local_rank", "--local-rank", type=nonnegative_int,
                        default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group if there is one; a plain ``python`` run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


class StageClock:
    """Wall time of each evaluation stage, logged when it ends (so a slow task is visible in the log)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        logger.info("%s: %.1f s", stage, now - self.start)
        self.start = now


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from mlip_dist.evaluation import tasks
    from mlip_dist.evaluation.benchmarks import load_prompts
    from mlip_dist.evaluation.extract import extract_features, gather_features
    from mlip_dist.model_io import load_run, load_tokenizer

    rank, world_size, device = init_distributed()
    setup_logging(rank)
    loaded = load_run(args.checkpoint, device, select=args.select)
    config, model = loaded.config, loaded.model
    tokenizer = load_tokenizer(config)
    from mlip_dist.data import remote

    dataset_info = json.loads(remote.read_text(remote.join(args.data, "dataset.json")))  # a folder or a URL
    prompts = load_prompts(args.prompts)
    kind, classes = tasks.classes_for(dataset_info, prompts)
    wanted = TASKS if args.task == "all" else (args.task,)
    needs_train = any(t in wanted for t in ("linear_probe", "segmentation")) and args.train_split in dataset_info["splits"]
    image_cfg = config.model.image
    common = dict(image_size=image_cfg.image_size, in_chans=image_cfg.in_chans, max_length=config.model.text.max_length,
                  max_sentences=config.model.max_sentences, batch_size=args.batch_size, rank=rank,
                  world_size=world_size, device=device, progress=not args.no_progress)
    logger.info("evaluating %s on %s (%s, %d classes), tasks %s, %d rank(s)", loaded.tag_dir, args.data, kind,
                len(classes), ",".join(wanted), world_size)
    segment = "segmentation" in wanted
    finetune = segment and args.seg_finetune
    clock = StageClock()
    test = gather_features(extract_features(model, tokenizer, args.data, args.split, with_patch_tokens=segment,
                                            max_samples=args.max_samples,
                                            with_images=finetune, **common), world_size)
    train = None
    if needs_train:
        train = gather_features(extract_features(model, tokenizer, args.data, args.train_split,
                                                 with_patch_tokens=segment, with_patches=False, with_images=finetune,
                                                 **common), world_size)
    clock.lap(f"features of {len(test)} {args.split} + {len(train) if train else 0} {args.train_split} images")
    loss_cfg = config.loss
    score_kwargs = dict(logit_scale=float(model.logit_scale().detach()), local_temperature=loss_cfg.local_temperature,
                        eps=loss_cfg.ot_epsilon, max_iter=loss_cfg.ot_max_iter, tol=loss_cfg.ot_tol)
    grid = model.image_encoder.grid_size
    results: dict[str, Any] = {"checkpoint": str(loaded.tag_dir), "data": str(args.data), "kind": kind,
                               "test_images": len(test)}
    prompt_features = {}
    if "zero_shot" in wanted or ("grounding" in wanted and kind != "reports"):
        prompt_features = tasks.encode_prompts(model, tokenizer, {c: prompts[c] for c in classes if c in prompts},
                                               config.model.text.max_length, device)
    if "zero_shot" in wanted:
        if kind == "chexpert5x200":
            results["zero_shot"] = tasks.zero_shot_multiclass(test, prompt_features, classes, **score_kwargs)
        else:
            results["zero_shot"] = tasks.zero_shot_binary(test, prompt_features, classes, **score_kwargs)
        clock.lap("zero_shot")
    if "retrieval" in wanted:
        results["retrieval"] = tasks.retrieval(test)
        clock.lap("retrieval")
    if "linear_probe" in wanted:
        results["linear_probe"] = tasks.linear_probe(train, test, classes, seed=args.seed) if train else {
            "skipped": f"no {args.train_split} split"}
        clock.lap("linear_probe")
    label_bits: dict[str, int] = {}
    for meta in test.meta + (train.meta if train else []):
        label_bits.update(meta.get("regions") or {})
    if "segmentation" in wanted:
        if train is None:
            results["segmentation"] = {"skipped": f"no {args.train_split} split"}
        else:
            names = sorted(label_bits, key=label_bits.get) if kind == "reports" else classes[:1]
            channels = [label_bits[n] for n in names] if kind == "reports" else None
            results["segmentation"] = tasks.segmentation(
                train, test, grid=grid, image_size=image_cfg.image_size, channels=channels, channel_names=names,
                epochs=args.seg_epochs, seed=args.seed, encoder=model.image_encoder if finetune else None,
                device=device)
        clock.lap("segmentation")
    if "grounding" in wanted:
        solver = dict(eps=loss_cfg.ot_epsilon, max_iter=loss_cfg.ot_max_iter, tol=loss_cfg.ot_tol, keep_maps=8)
        if kind == "reports":
            results["grounding"] = tasks.grounding(test, grid=grid, label_bits=label_bits, **solver)
        elif classes and classes[0] in prompt_features and any(m is not None for m in test.masks):
            results["grounding"] = tasks.prompt_grounding(test, prompt_features[classes[0]], class_name=classes[0],
                                                          grid=grid, **solver)
        else:
            results["grounding"] = {"skipped": "no region masks in these shards"}
        clock.lap("grounding")
    if rank == 0:
        write_outputs(args, loaded, results, test)
    if dist.is_initialized():
        dist.barrier()
    return results


def write_outputs(args: argparse.Namespace, loaded: Any, results: dict[str, Any], test: Any) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    from mlip_dist.evaluation import report

    out = Path(args.out) if args.out else loaded.run_dir / "eval" / Path(args.data).name
    report.write_results(out, results)
    step = int(loaded.tag_dir.name.split("_")[-1])
    writer = SummaryWriter(str(out / "tensorboard"))
    for name, value in report.flatten(report.public(results)).items():
        writer.add_scalar(f"eval/{name}", value, step)
    writer.close()
    curves = results.get("zero_shot", {}).get("_curves")
    if curves:
        report.plot_roc_curves(curves, out / "roc_curves.png")
    examples = results.get("grounding", {}).get("_examples")
    if examples:
        report.heatmap_grid(grounding_pictures(args, loaded, test, examples), out / "grounding_heatmaps.png")
    print(report.markdown_table(results))
    logger.info("results in %s", out)
    return out


def grounding_pictures(args: argparse.Namespace, loaded: Any, test: Any, examples: list[Any]) -> list[Any]:
    """Each example sentence's OT heat map over its X-ray, the ground-truth region outlined in the caption."""
    import numpy as np

    from mlip_dist.data.loader import AugmentConfig, decode_image, preprocess_image
    from mlip_dist.evaluation.extract import iterate_split
    from mlip_dist.viz import overlay, patch_heatmap

    image_cfg = loaded.config.model.image
    wanted = {test.keys[index] for index, *_ in examples}
    images = {}
    for raw in iterate_split(args.data, args.split, 0, 1):
        if raw.get("__key__") in wanted:
            augment = AugmentConfig(image_size=image_cfg.image_size, in_chans=1, enabled=False)
            images[raw["__key__"]] = preprocess_image(decode_image(raw.get("png", raw.get("jpg"))), augment, None)
    pictures = []
    for index, caption, heat, region in examples:
        image = images[test.keys[index]]
        heat_map = patch_heatmap(torch.from_numpy(np.ascontiguousarray(heat)).flatten(), heat.shape, image.shape[-2:])
        outlined = image.clone()
        outlined[0][torch.from_numpy(region) & (heat_map < 0.5)] += 0.5  # ground truth brightened
        pictures.append(overlay(outlined, heat_map, caption))
    return pictures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    evaluate(args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
