"""Evaluation benchmarks: readers for the public layouts, seeded split builders, region codecs
and the zero-shot prompt sets (METHOD.md, Evaluation).

Layouts read exactly as the public releases ship them:

* **CheXpert 5x200** (built from ``CheXpert-v1.0-small/train.csv`` or ``CheXpert-v1.0/train.csv``;
  columns ``Path, Sex, Age, Frontal/Lateral, AP/PA`` + the 14 CheXpert labels with values
  ``1.0`` / ``0.0`` / ``-1.0`` / empty; ``Path`` is relative to the folder that holds the
  ``CheXpert-v1.0*`` folder). Rule (:func:`chexpert_exclusive_class`): a **frontal** image
  qualifies for competition finding *c* when its label for *c* is ``1.0`` (positive) and its
  label for each of the other four competition findings is not ``1.0``; uncertain (``-1.0``)
  and empty count as *not positive*. The 9 non-competition labels are not constrained. So an
  image qualifies for at most one class. From the qualifying images of each class (sorted by
  path, so the CSV row order does not matter) ``per_class`` are drawn without replacement with
  ``numpy.random.default_rng(seed)``; with fewer, all are used and a warning is recorded.
  Everything lands in the split ``test``.
* **RSNA Pneumonia** (``stage_2_train_labels.csv``: ``patientId,x,y,width,height,Target``, one
  row per box, ``Target`` 0 rows with an empty box; images ``stage_2_train_images/<patientId>.dcm``).
  Label ``Pneumonia`` = Target; split 70/15/15 by ``patientId`` (:func:`assign_splits`).
* **SIIM-ACR Pneumothorax** (``train-rle.csv``: ``ImageId, EncodedPixels``, the SIIM relative
  run-length code, ``-1`` for an empty mask, several rows per image for several regions; images
  ``dicom-images-train/<study>/<series>/<ImageId>.dcm``). Mask = union of all rows of an image
  (:func:`rle_decode`); label ``Pneumothorax`` = mask non-empty; split 70/15/15 by ``ImageId``,
  never by CSV row, so all rows of one image land in one split.

Nothing here decodes pixels: ``tools/make_eval_shards.py`` turns a :class:`BenchmarkPlan` into
shards with :mod:`mlip_dist.data.dicom` / :mod:`mlip_dist.data.imaging`.
"""

from __future__ import annotations

import csv
import enum
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mlip_dist.data.mimic import CHEXPERT_LABELS

# CheXpert competition findings in the class-index order of the 5x200 benchmark.
COMPETITION_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
SPLITS: tuple[str, ...] = ("train", "validate", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)

RSNA_LABELS_CSV = "stage_2_train_labels.csv"
RSNA_IMAGES_DIR = "stage_2_train_images"
SIIM_RLE_CSV = "train-rle.csv"
SIIM_IMAGES_DIR = "dicom-images-train"
CHEXPERT_DIR_PATTERN = "CheXpert-v1.0*"


class Benchmark(str, enum.Enum):
    CHEXPERT_5X200 = "chexpert5x200"
    RSNA = "rsna"
    SIIM = "siim"


class BenchmarkDataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file, the row and the reason."""


# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixel units: top-left ``(x, y)`` (x = column), ``width``, ``height``."""

    x: float
    y: float
    width: float
    height: float

    def scaled(self, scale_x: float, scale_y: float) -> Box:
        """The same box after the image is resized by ``scale_x`` (columns) and ``scale_y`` (rows)."""
        return Box(self.x * scale_x, self.y * scale_y, self.width * scale_x, self.height * scale_y)

    def as_list(self) -> list[float]:
        return [self.x, self.y, self.width, self.height]


def boxes_to_mask(boxes: Iterable[Box], height: int, width: int) -> np.ndarray:
    """Bool (height, width) mask, True at every pixel whose centre lies in some box.

    Pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``; it is inside box ``b`` when
    ``b.x <= c + 0.5 < b.x + b.width`` and likewise for rows. Pixel-aligned boxes therefore
    cover exactly ``width x height`` pixels; boxes are clipped to the image.
    """
    mask = np.zeros((height, width), dtype=bool)
    col_centres = np.arange(width) + 0.5
    row_centres = np.arange(height) + 0.5
    for box in boxes:
        cols = (col_centres >= box.x) & (col_centres < box.x + box.width)
        rows = (row_centres >= box.y) & (row_centres < box.y + box.height)
        mask |= rows[:, None] & cols[None, :]
    return mask


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode one SIIM-ACR run-length string into a bool (height, width) mask.

    The SIIM code (``mask_functions.rle2mask`` of the competition) lists pairs
    ``(gap, length)``: the first gap is the absolute start of the first run, each later gap
    is counted from the end of the previous run. Pixels are numbered column-major (down the
    first column, then the next), which is why the competition's kernels transpose the
    decoded array. ``"-1"`` or an empty string is an empty mask. Raises ValueError on an odd
    number of values, negative gaps, non-positive lengths or runs past the image end.
    """
    text = rle.strip()
    if text in ("", "-1"):
        return np.zeros((height, width), dtype=bool)
    try:
        values = np.array([int(token) for token in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"run-length code has a non-integer value: {text[:60]!r}") from None
    if values.size % 2:
        raise ValueError(f"run-length code has an odd number of values ({values.size})")
    gaps, lengths = values[0::2], values[1::2]
    if (gaps < 0).any() or (lengths <= 0).any():
        raise ValueError("run-length code has a negative gap or a non-positive run length")
    # Absolute start of run i = sum of gaps[0..i] + sum of lengths[0..i-1].
    starts = np.cumsum(gaps) + np.cumsum(lengths) - lengths
    ends = starts + lengths
    total = height * width
    if ends[-1] > total:
        raise ValueError(
            f"run-length code runs to pixel {int(ends[-1])} past the image end ({height}x{width}={total})"
        )
    edges = np.zeros(total + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask in the SIIM-ACR relative, column-major run-length code (inverse of
    :func:`rle_decode`); an empty mask gives ``"-1"`` as in ``train-rle.csv``."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]]).astype(np.int8)
    change = np.diff(padded)
    starts = np.flatnonzero(change == 1)
    ends = np.flatnonzero(change == -1)
    if starts.size == 0:
        return "-1"
    gaps = starts - np.concatenate([[0], ends[:-1]])
    pairs = np.stack([gaps, ends - starts], axis=1).reshape(-1)
    return " ".join(str(int(v)) for v in pairs)


def union_rle_mask(rles: Iterable[str], height: int, width: int) -> np.ndarray:
    """Union of the masks of all RLE rows of one image (bool (height, width))."""
    mask = np.zeros((height, width), dtype=bool)
    for rle in rles:
        mask |= rle_decode(rle, height, width)
    return mask


# --------------------------------------------------------------------------- splits


def assign_splits(
    ids: Iterable[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    names: Sequence[str] = SPLITS,
) -> dict[str, str]:
    """Map each unique id to a split name, seeded and independent of input order.

    The unique ids are sorted, permuted with ``numpy.random.default_rng(seed)`` and cut at
    ``round(n * cumulative fraction)``; so the same id set and seed always give the same
    assignment, and a grouping id (patient, image) can never appear in two splits.
    """
    if len(fractions) != len(names):
        raise ValueError(f"{len(fractions)} fractions for {len(names)} split names")
    if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    unique = sorted(set(ids))
    order = np.random.default_rng(seed).permutation(len(unique))
    bounds = [math.floor(len(unique) * c + 0.5) for c in np.cumsum(fractions)]
    bounds[-1] = len(unique)
    assignment: dict[str, str] = {}
    start = 0
    for name, stop in zip(names, bounds, strict=True):
        for position in order[start:stop]:
            assignment[unique[position]] = name
        start = stop
    return assignment


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class EvalItem:
    """One evaluation image: where it is, which split, and its labels/regions in original pixels."""

    sample_id: str
    split: str
    image_path: Path
    source: str  # path relative to the benchmark root, for the sample json
    labels: dict[str, float | None]
    class_index: int | None = None
    class_name: str | None = None
    boxes: tuple[Box, ...] = ()  # RSNA, original pixel units
    rles: tuple[str, ...] = ()  # SIIM, one per CSV row ("-1" rows included)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkPlan:
    """The items of one benchmark in a fixed order, with its class list and the reader's warnings."""

    benchmark: Benchmark
    classes: list[str]
    items: list[EvalItem]
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _read_csv_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts with stripped header names (SIIM writes ``" EncodedPixels"``)."""
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise BenchmarkDataError(f"{path}: empty CSV (no header)") from None
        missing = [name for name in required if name not in header]
        if missing:
            raise BenchmarkDataError(f"{path}: missing column(s) {missing}; header is {header}")
        rows = []
        for line_no, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                raise BenchmarkDataError(f"{path}:{line_no}: {len(values)} fields, header has {len(header)}")
            rows.append(dict(zip(header, values, strict=True)))
    return rows


# ---- CheXpert


@dataclass(frozen=True)
class ChexpertRecord:
    path: str  # as in the CSV, relative to the folder holding CheXpert-v1.0*
    sex: str
    age: int | None
    frontal: bool
    ap_pa: str
    labels: dict[str, float | None]


def _label_value(text: str, where: str) -> float | None:
    text = text.strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise BenchmarkDataError(f"{where}: label {text!r} is not 1.0, 0.0, -1.0 or empty") from None
    if value not in (1.0, 0.0, -1.0):
        raise BenchmarkDataError(f"{where}: label {text!r} is not 1.0, 0.0, -1.0 or empty")
    return value


def read_chexpert_csv(path: str | Path) -> list[ChexpertRecord]:
    """Read a CheXpert ``train.csv`` / ``valid.csv`` (columns as released, labels 1/0/-1/empty)."""
    path = Path(path)
    rows = _read_csv_rows(path, ("Path", "Frontal/Lateral", *CHEXPERT_LABELS))
    records = []
    for line_no, row in enumerate(rows, start=2):
        where = f"{path}:{line_no}"
        age_text = row.get("Age", "").strip()
        records.append(
            ChexpertRecord(
                path=row["Path"].strip(),
                sex=row.get("Sex", "").strip(),
                age=int(float(age_text)) if age_text else None,
                frontal=row["Frontal/Lateral"].strip().lower() == "frontal",
                ap_pa=row.get("AP/PA", "").strip(),
                labels={
                    name: _label_value(row[name], f"{where} column {name!r}") for name in CHEXPERT_LABELS
                },
            )
        )
    return records


def chexpert_exclusive_class(record: ChexpertRecord) -> int | None:
    """Index in COMPETITION_FINDINGS of the one competition finding this frontal image is
    positive for, or None (lateral, no positive, or several positives; uncertain = not positive)."""
    if not record.frontal:
        return None
    positives = [i for i, name in enumerate(COMPETITION_FINDINGS) if record.labels.get(name) == 1.0]
    return positives[0] if len(positives) == 1 else None


def find_chexpert_csv(root: str | Path, csv_name: str = "train.csv") -> tuple[Path, Path]:
    """(csv path, base folder the CSV's Path column is relative to) for a CheXpert root.

    ``root`` may hold a ``CheXpert-v1.0*`` folder or be that folder itself."""
    root = Path(root)
    if (root / csv_name).is_file() and root.name.startswith("CheXpert-v1.0"):
        return root / csv_name, root.parent
    candidates = sorted(p for p in root.glob(f"{CHEXPERT_DIR_PATTERN}/{csv_name}") if p.is_file())
    if not candidates:
        raise BenchmarkDataError(
            f"{root}: no {CHEXPERT_DIR_PATTERN}/{csv_name} (expected the CheXpert release layout)"
        )
    return candidates[0], root


def _chexpert_sample_id(path: str) -> str:
    """``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` -> ``train/patient00001/study1/view1_frontal``."""
    parts = Path(path).with_suffix("").parts
    return "/".join(parts[1:] if parts and parts[0].startswith("CheXpert-v1.0") else parts)


def plan_chexpert_5x200(
    root: str | Path, per_class: int = 200, seed: int = 0, csv_name: str = "train.csv"
) -> BenchmarkPlan:
    """The CheXpert 5x200 subset (rule in the module docstring), items ordered by class then draw."""
    csv_path, base = find_chexpert_csv(root, csv_name)
    records = read_chexpert_csv(csv_path)
    by_class: dict[int, list[ChexpertRecord]] = {i: [] for i in range(len(COMPETITION_FINDINGS))}
    for record in records:
        index = chexpert_exclusive_class(record)
        if index is not None:
            by_class[index].append(record)
    rng = np.random.default_rng(seed)
    items: list[EvalItem] = []
    warnings: list[str] = []
    available: dict[str, int] = {}
    for index, name in enumerate(COMPETITION_FINDINGS):
        candidates = sorted(by_class[index], key=lambda r: r.path)
        available[name] = len(candidates)
        if len(candidates) < per_class:
            # The CSV is named relative to the root: dataset.json must not depend on where the data lies.
            warnings.append(
                f"{csv_path.parent.name}/{csv_path.name}: only {len(candidates)} frontal images are positive for {name!r} alone "
                f"(wanted {per_class}); using all of them"
            )
        # One draw per class in a fixed class order keeps the subset reproducible from the seed.
        chosen = rng.permutation(len(candidates))[:per_class]
        for position in chosen:
            record = candidates[position]
            items.append(
                EvalItem(
                    sample_id=_chexpert_sample_id(record.path),
                    split="test",
                    image_path=base / record.path,
                    source=record.path,
                    labels=dict(record.labels),
                    class_index=index,
                    class_name=name,
                    extra={"sex": record.sex, "age": record.age, "view": record.ap_pa},
                )
            )
    return BenchmarkPlan(
        benchmark=Benchmark.CHEXPERT_5X200,
        classes=list(COMPETITION_FINDINGS),
        items=items,
        warnings=warnings,
        info={
            "csv": csv_path.name,
            "per_class": per_class,
            "available": available,
            "rule": "exclusive_positive_frontal",
        },
    )


# ---- RSNA


@dataclass(frozen=True)
class RsnaRecord:
    patient_id: str
    target: int
    boxes: tuple[Box, ...]


def read_rsna_labels(path: str | Path) -> dict[str, RsnaRecord]:
    """Group ``stage_2_train_labels.csv`` rows by patientId (one image each), boxes in CSV order.

    Raises BenchmarkDataError when a Target 1 row lacks a box, a Target 0 row has one, or the
    rows of one patient disagree on Target."""
    path = Path(path)
    rows = _read_csv_rows(path, ("patientId", "x", "y", "width", "height", "Target"))
    targets: dict[str, int] = {}
    boxes: dict[str, list[Box]] = {}
    for line_no, row in enumerate(rows, start=2):
        where = f"{path}:{line_no}"
        patient = row["patientId"].strip()
        target_text = row["Target"].strip()
        if target_text not in ("0", "1"):
            raise BenchmarkDataError(f"{where}: Target {target_text!r} is not 0 or 1")
        target = int(target_text)
        if targets.setdefault(patient, target) != target:
            raise BenchmarkDataError(f"{where}: patient {patient} has rows with Target 0 and 1")
        box_text = [row[k].strip() for k in ("x", "y", "width", "height")]
        boxes.setdefault(patient, [])
        if target == 1:
            try:
                x, y, w, h = (float(v) for v in box_text)
            except ValueError:
                raise BenchmarkDataError(
                    f"{where}: Target 1 row needs numeric x,y,width,height, got {box_text}"
                ) from None
            if w <= 0 or h <= 0:
                raise BenchmarkDataError(f"{where}: box width/height must be positive, got {box_text}")
            boxes[patient].append(Box(x, y, w, h))
        elif any(box_text):
            raise BenchmarkDataError(f"{where}: Target 0 row has a box {box_text}")
    return {p: RsnaRecord(p, targets[p], tuple(boxes[p])) for p in targets}


def plan_rsna(
    root: str | Path, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> BenchmarkPlan:
    """RSNA Pneumonia items sorted by patientId, split by patient (module docstring)."""
    root = Path(root)
    records = read_rsna_labels(root / RSNA_LABELS_CSV)
    splits = assign_splits(records, fractions, seed)
    items = [
        EvalItem(
            sample_id=pid,
            split=splits[pid],
            image_path=root / RSNA_IMAGES_DIR / f"{pid}.dcm",
            source=f"{RSNA_IMAGES_DIR}/{pid}.dcm",
            labels={"Pneumonia": float(records[pid].target)},
            boxes=records[pid].boxes,
        )
        for pid in sorted(records)
    ]
    return BenchmarkPlan(Benchmark.RSNA, ["Pneumonia"], items, info={"fractions": list(fractions)})


# ---- SIIM


def read_siim_rle(path: str | Path) -> dict[str, list[str]]:
    """``train-rle.csv`` grouped by ImageId: every EncodedPixels string of the image, in CSV order."""
    path = Path(path)
    rows = _read_csv_rows(path, ("ImageId", "EncodedPixels"))
    grouped: dict[str, list[str]] = {}
    for line_no, row in enumerate(rows, start=2):
        image_id = row["ImageId"].strip()
        if not image_id:
            raise BenchmarkDataError(f"{path}:{line_no}: empty ImageId")
        grouped.setdefault(image_id, []).append(row["EncodedPixels"].strip())
    return grouped


def index_dicoms(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for every ``*.dcm`` under ``folder`` (SIIM nests study/series folders)."""
    if not folder.is_dir():
        raise BenchmarkDataError(f"{folder}: image folder not found")
    index: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.dcm")):
        if path.stem in index:
            raise BenchmarkDataError(f"{path}: ImageId {path.stem} also at {index[path.stem]}")
        index[path.stem] = path
    return index


def plan_siim(
    root: str | Path, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> BenchmarkPlan:
    """SIIM-ACR items sorted by ImageId, split by ImageId (module docstring). Images named in the
    CSV without a DICOM keep ``image_path`` pointing at the expected place so the packer reports them."""
    root = Path(root)
    rles = read_siim_rle(root / SIIM_RLE_CSV)
    dicoms = index_dicoms(root / SIIM_IMAGES_DIR)
    splits = assign_splits(rles, fractions, seed)
    items = []
    for image_id in sorted(rles):
        path = dicoms.get(image_id, root / SIIM_IMAGES_DIR / f"{image_id}.dcm")
        positive = any(r not in ("", "-1") for r in rles[image_id])
        items.append(
            EvalItem(
                sample_id=image_id,
                split=splits[image_id],
                image_path=path,
                source=path.relative_to(root).as_posix(),
                labels={"Pneumothorax": float(positive)},
                rles=tuple(rles[image_id]),
            )
        )
    return BenchmarkPlan(Benchmark.SIIM, ["Pneumothorax"], items, info={"fractions": list(fractions)})


def plan_benchmark(
    benchmark: Benchmark,
    root: str | Path,
    seed: int = 0,
    per_class: int = 200,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> BenchmarkPlan:
    if benchmark is Benchmark.CHEXPERT_5X200:
        return plan_chexpert_5x200(root, per_class=per_class, seed=seed)
    if benchmark is Benchmark.RSNA:
        return plan_rsna(root, seed=seed, fractions=fractions)
    return plan_siim(root, seed=seed, fractions=fractions)


_KEY_UNSAFE = re.compile(r"[^0-9A-Za-z_-]")


def shard_key(sample_id: str) -> str:
    """WebDataset key for an id: dots (SIIM ImageIds) and slashes become ``_``, because webdataset
    splits a member name at its first dot into key and extension."""
    return _KEY_UNSAFE.sub("_", sample_id)


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSet:
    """Zero-shot prompts of one class: score = softmax(mean positive sim, mean negative sim)."""

    class_name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def load_prompts(path: str | Path | None = None) -> dict[str, PromptSet]:
    """Prompt sets by class name from ``prompts.json`` (default: the packaged
    ``mlip_dist/resources/prompts.json``). Every set is checked: non-empty, strings, no prompt
    both positive and negative."""
    if path is None:
        text = resources.files("mlip_dist").joinpath("resources/prompts.json").read_text(encoding="utf-8")
        where = "mlip_dist/resources/prompts.json"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{where}: not valid JSON ({err})") from err
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise BenchmarkDataError(f"{where}: expected an object with a non-empty 'classes' mapping")
    prompt_sets = {}
    for name, entry in classes.items():
        sets = {}
        for polarity in ("positive", "negative"):
            prompts = entry.get(polarity) if isinstance(entry, dict) else None
            if (
                not isinstance(prompts, list)
                or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)
            ):
                raise BenchmarkDataError(
                    f"{where}: class {name!r} needs a non-empty list of {polarity} prompt strings"
                )
            sets[polarity] = tuple(prompts)
        overlap = set(sets["positive"]) & set(sets["negative"])
        if overlap:
            raise BenchmarkDataError(
                f"{where}: class {name!r} has prompts that are both positive and negative: {sorted(overlap)}"
            )
        prompt_sets[name] = PromptSet(name, sets["positive"], sets["negative"])
    return prompt_sets
