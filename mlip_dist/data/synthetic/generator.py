"""Synthetic MIMIC-CXR generator: study plan, per-study rendering and the evaluation sets.

Determinism: the study plan (subject/study ids, splits, dates) is drawn sequentially from
``SeedSequence([seed, PLAN])``; every study (and every evaluation image) then has its own RNG
``SeedSequence([seed, stream, index])``, so any number of worker processes produce
byte-identical files for a given seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlip_dist.data.synthetic import layouts
from mlip_dist.data.synthetic.findings import (
    CHEXPERT_LABELS,
    COMPETITION,
    Certainty,
    Finding,
    Label,
    Laterality,
    cardiothoracic_ratio,
    draw_finding,
    mediastinum_scale,
    sample_finding,
)
from mlip_dist.data.synthetic.phantom import (
    MAX_12BIT,
    Anatomy,
    Exposure,
    Grid,
    View,
    expose,
    render_anatomy,
    resize_mask,
    sample_frontal,
    sample_lateral,
    work_shape,
)
from mlip_dist.data.synthetic.reports import sample_findings, sample_indication, write_report


class ImageFormat(str, enum.Enum):
    DICOM = "dicom"
    JPG = "jpg"


class Stream(int, enum.Enum):
    """Independent RNG streams (one per purpose) under the user's seed."""

    PLAN = 0
    MIMIC = 1
    CHEXPERT = 2
    RSNA = 3
    SIIM = 4


@dataclass
class SyntheticConfig:
    """Options of tools/make_synthetic.py (docs/SYNTHETIC.md)."""

    out: str = "data/synthetic"
    studies: int = 200
    seed: int = 0
    format: ImageFormat = ImageFormat.DICOM
    image_size: int = 2500  # long side of MIMIC images (each image varies slightly below it)
    images_per_study: int = 3  # at most: frontal [+ lateral] [+ second frontal]
    lateral_rate: float = 0.6
    second_frontal_rate: float = 0.08
    monochrome1_rate: float = 0.15
    ap_rate: float = 0.35
    normal_rate: float = 0.3
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    eval_sets: bool = True
    eval_images: int | None = None  # default: studies // 4 within [16, 5000]
    workers: int = 1
    progress: bool = True

    def resolved_eval_images(self) -> int:
        if self.eval_images is not None:
            return self.eval_images
        return int(min(max(self.studies // 4, 16), 5000))

    def validate(self) -> None:
        checks = [
            (self.studies >= 1, "--studies must be >= 1"),
            (self.image_size >= 64, "--image-size must be >= 64"),
            (self.images_per_study >= 1, "--images-per-study must be >= 1"),
            (self.workers >= 1, "--workers must be >= 1"),
            (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1, "split fractions must be in [0, 1) and sum below 1"),
            (self.eval_images is None or self.eval_images >= 1, "--eval-images must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def stream_rng(seed: int, stream: Stream, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, int(stream), index]))


# ----------------------------------------------------------------------------------------------
# Rendering one image
# ----------------------------------------------------------------------------------------------
@dataclass
class RenderedImage:
    pixels: np.ndarray  # uint16 MONOCHROME2 values in [0, exposure.max_value]
    max_value: int
    regions: np.ndarray  # uint16 bit mask, bit = Label.bit, positive findings only
    finding_masks: dict[int, np.ndarray] = field(default_factory=dict)  # finding index -> bool (full res)


def image_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """Portrait-ish (rows, columns) slightly varying per image like real detectors."""
    rows = int(round(long_side * rng.uniform(0.9, 1.0)))
    cols = int(round(rows * rng.uniform(0.78, 0.97)))
    return rows, cols


def render_image(
    findings: list[Finding],
    anatomy: Anatomy,
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    keep_masks: Callable[[Finding], bool] | None = None,
) -> RenderedImage:
    """Render anatomy + findings; the regions PNG gets a bit for every positive finding."""
    h, w = work_shape(height, width)
    grid = Grid.make(h, w, rng.uniform(-0.05, 0.05), (rng.uniform(-0.03, 0.03), rng.uniform(-0.025, 0.025)))
    layers = render_anatomy(anatomy, grid, rng)
    regions = np.zeros((h, w), dtype=np.uint16)
    kept: dict[int, np.ndarray] = {}
    for index, finding in enumerate(findings):
        if finding.certainty is Certainty.NEGATIVE:
            continue
        mask = draw_finding(finding, anatomy, grid, layers)
        if finding.certainty is Certainty.POSITIVE:
            regions[mask] |= np.uint16(1 << finding.label.bit)
            if keep_masks is not None and keep_masks(finding):
                kept[index] = resize_mask(mask.astype(np.uint8), height, width).astype(bool)
    exposure = Exposure.sample(rng)
    pixels = expose(layers.composite(), height, width, exposure, rng)
    return RenderedImage(pixels, exposure.max_value, resize_mask(regions, height, width), kept)


def study_anatomy(findings: list[Finding], view: View, rng: np.random.Generator) -> Anatomy:
    ctr = cardiothoracic_ratio(findings, rng)
    scale = mediastinum_scale(findings)
    if view.frontal:
        anatomy = sample_frontal(rng, ctr, scale)
        return dataclasses.replace(anatomy, view=view)
    return sample_lateral(rng, ctr, scale)


# ----------------------------------------------------------------------------------------------
# MIMIC-CXR
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyTask:
    index: int
    subject_id: int
    study_id: int
    split: str
    when: dt.datetime


@dataclass
class StudyResult:
    subject_id: int
    study_id: int
    labels: dict[str, float | None]
    metadata_rows: list[tuple] = field(default_factory=list)
    record_rows: list[tuple] = field(default_factory=list)
    region_rows: list[tuple] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def plan_studies(config: SyntheticConfig) -> list[StudyTask]:
    """Subjects with 1-6 studies each, unique 8-digit ids, subject-level splits, study dates."""
    rng = stream_rng(config.seed, Stream.PLAN, 0)
    used_subjects: set[int] = set()
    used_studies: set[int] = set()
    tasks: list[StudyTask] = []
    while len(tasks) < config.studies:
        subject = int(rng.integers(10_000_000, 20_000_000))
        if subject in used_subjects:
            continue
        used_subjects.add(subject)
        draw = rng.random()
        split = "validate" if draw < config.val_fraction else "test" if draw < config.val_fraction + config.test_fraction else "train"
        when = dt.datetime(2110, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 80)))
        for _ in range(min(int(rng.geometric(0.45)), 6, config.studies - len(tasks))):
            study = int(rng.integers(50_000_000, 60_000_000))
            while study in used_studies:
                study = int(rng.integers(50_000_000, 60_000_000))
            used_studies.add(study)
            when = when + dt.timedelta(days=int(rng.integers(1, 400)), seconds=int(rng.integers(0, 86400)))
            tasks.append(StudyTask(len(tasks), subject, study, split, when))
    return tasks


def dicom_id(rng: np.random.Generator) -> str:
    """MIMIC-style ``8hex-8hex-8hex-8hex-8hex``."""
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5, dtype=np.uint64))


VIEW_MEANING = {View.PA: "postero-anterior", View.AP: "antero-posterior", View.LL: "left lateral"}


def generate_study(task: StudyTask, config: SyntheticConfig) -> StudyResult:
    """Write one study (report, images, region masks) and return its CSV rows."""
    rng = stream_rng(config.seed, Stream.MIMIC, task.index)
    root = Path(config.out)
    findings = sample_findings(rng, normal_rate=config.normal_rate)
    frontal_view = View.AP if rng.random() < config.ap_rate else View.PA
    views = [frontal_view]
    if config.images_per_study >= 2 and frontal_view is View.PA and rng.random() < config.lateral_rate:
        views.append(View.LL)
    if config.images_per_study >= 3 and rng.random() < config.second_frontal_rate:
        views.append(frontal_view)
    views = views[: config.images_per_study]
    exam = "CHEST (PA AND LAT)" if View.LL in views else ("CHEST (PORTABLE AP)" if frontal_view is View.AP else "CHEST (PA)")
    report = write_report(findings, rng, exam=exam, indication=sample_indication(rng))

    study_dir = layouts.mimic_study_dir(task.subject_id, task.study_id)
    layouts.atomic_write_bytes(root / f"{study_dir}.txt", report.text.encode("utf-8"))
    result = StudyResult(task.subject_id, task.study_id, report.labels, files=[f"{study_dir}.txt"])
    study_uid = layouts.deterministic_uid(config.seed, "study", task.study_id)
    anatomies = {View.PA: None, View.AP: None, View.LL: None}
    for number, view in enumerate(views):
        if anatomies[view] is None:
            anatomies[view] = study_anatomy(findings, view, rng)
        image_id = dicom_id(rng)
        height, width = image_size(rng, config.image_size)
        image = render_image(findings, anatomies[view], height, width, rng)
        extension = "dcm" if config.format is ImageFormat.DICOM else "jpg"
        relative = f"{study_dir}/{image_id}.{extension}"
        if config.format is ImageFormat.DICOM:
            photometric = "MONOCHROME1" if rng.random() < config.monochrome1_rate else "MONOCHROME2"
            stored = MAX_12BIT - image.pixels if photometric == "MONOCHROME1" else image.pixels
            fields = layouts.DicomFields(
                patient_id=str(task.subject_id),
                study_uid=study_uid,
                series_uid=layouts.deterministic_uid(config.seed, "series", task.study_id, number),
                sop_uid=layouts.deterministic_uid(config.seed, "sop", image_id),
                view_position=view.value,
                study_date=task.when.strftime("%Y%m%d"),
                study_time=task.when.strftime("%H%M%S.000"),
                modality="DX" if view is not View.AP else "CR",
                study_id=str(task.study_id),
                description=exam,
                patient_orientation=("P", "F") if view is View.LL else ("L", "F"),
            )
            data = layouts.dicom_bytes(stored.astype(np.uint16), fields, bits_stored=12, photometric=photometric)
        else:
            data = layouts.jpg_bytes(layouts.to_uint8(image.pixels, image.max_value))
        layouts.atomic_write_bytes(root / relative, data)
        layouts.atomic_write_bytes(root / "regions" / f"{image_id}.png", layouts.png_bytes(image.regions))
        result.files += [relative, f"regions/{image_id}.png"]
        orientation = "Erect" if view is not View.AP else ["Recumbent", "Erect", ""][int(rng.integers(3))]
        result.metadata_rows.append((
            image_id, task.subject_id, task.study_id, exam, view.value, height, width,
            int(task.when.strftime("%Y%m%d")), task.when.strftime("%H%M%S.%f")[:10].rstrip("0").rstrip("."),
            exam, VIEW_MEANING[view], orientation,
        ))
        result.record_rows.append((task.subject_id, task.study_id, image_id, relative))
        combined = int(np.bitwise_or.reduce(image.regions.ravel()))
        present = {bit for bit in range(16) if combined >> bit & 1}
        for index, sentences in report.sentences_by_finding.items():
            finding = findings[index]
            if finding.label.bit in present:
                for sentence in sentences:
                    result.region_rows.append((image_id, finding.label.value, finding.label.bit, sentence))
    return result


def _mimic_worker(args: tuple[StudyTask, SyntheticConfig]) -> StudyResult:
    return generate_study(*args)


def _ordered_map(function: Callable, items: list, pool: Pool | None) -> Iterator:
    """Results in input order (so CSV rows do not depend on the number of workers)."""
    if pool is None:
        yield from map(function, items)
        return
    workers = max(1, getattr(pool, "_processes", 1))
    yield from pool.imap(function, items, chunksize=max(1, min(16, len(items) // (workers * 4))))


def write_mimic_tables(root: Path, results: list[StudyResult], tasks: list[StudyTask], config: SyntheticConfig) -> None:
    split_of = {task.study_id: task.split for task in tasks}
    metadata = [row for r in results for row in r.metadata_rows]
    layouts.write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", layouts.MIMIC_METADATA_COLUMNS, metadata)
    layouts.write_csv_gz(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        layouts.MIMIC_SPLIT_COLUMNS,
        [(row[0], row[2], row[1], split_of[row[2]]) for row in metadata],
    )
    label_rows = [(r.subject_id, r.study_id, *(layouts.format_label(r.labels[name]) for name in CHEXPERT_LABELS)) for r in results]
    layouts.write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", layouts.MIMIC_LABEL_COLUMNS, label_rows)
    layouts.write_csv_gz(root / "mimic-cxr-2.0.0-negbio.csv.gz", layouts.MIMIC_LABEL_COLUMNS, label_rows)
    layouts.write_csv_gz(root / "mlip-synthetic-regions.csv.gz", layouts.REGION_COLUMNS, [row for r in results for row in r.region_rows])
    if config.format is ImageFormat.DICOM:
        layouts.write_csv_gz(root / "cxr-record-list.csv.gz", layouts.MIMIC_RECORD_COLUMNS, [row for r in results for row in r.record_rows])
        layouts.write_csv_gz(
            root / "cxr-study-list.csv.gz",
            layouts.MIMIC_STUDY_COLUMNS,
            [(r.subject_id, r.study_id, f"{layouts.mimic_study_dir(r.subject_id, r.study_id)}.txt") for r in results],
        )
    else:
        # MIMIC-CXR-JPG ships a plain list of its image files.
        names = "".join(f"{row[3]}\n" for r in results for row in r.record_rows)
        layouts.atomic_write_bytes(root / "IMAGE_FILENAMES", names.encode())


# ----------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------
def _eval_findings(rng: np.random.Generator, *, drop: tuple[Label, ...], uncertain: bool) -> list[Finding]:
    findings = [f for f in sample_findings(rng) if f.label not in drop]
    if not uncertain:
        findings = [f for f in findings if f.certainty is not Certainty.UNCERTAIN]
    return findings


def chexpert_image(index: int, total: int, config: SyntheticConfig) -> list[tuple]:
    """One CheXpert-v1.0-small patient (frontal, sometimes + lateral); returns its CSV rows.

    Patients ``index % 8 < 5`` are positive for exactly one competition finding (cycled), so
    any 5x200-style subset can be drawn once there are >= 1600 images.
    """
    rng = stream_rng(config.seed, Stream.CHEXPERT, index)
    n_valid = max(2, total // 10)
    split = "valid" if index >= total - n_valid else "train"
    if index % 8 < 5:
        findings = sample_findings(rng, only=(COMPETITION[index % 8],))
    else:
        findings = sample_findings(rng)
    if split == "valid":  # CheXpert's validation labels are certain (0/1)
        findings = [f for f in findings if f.certainty is not Certainty.UNCERTAIN]
    report = write_report(findings, rng, exam="CHEST", indication=sample_indication(rng))
    labels = dict(report.labels)
    if split == "valid":
        labels = {name: (0.0 if value is None else value) for name, value in labels.items()}
    sex = ["Male", "Female"][int(rng.integers(2))]
    age = int(rng.integers(18, 91))
    frontal = View.AP if rng.random() < 0.5 else View.PA
    views = [frontal] + ([View.LL] if rng.random() < 0.15 else [])
    rows = []
    long_side = min(config.image_size, 390)
    root = Path(config.out) / "chexpert"
    for number, view in enumerate(views, start=1):
        anatomy = study_anatomy(findings, view, rng)
        height, width = image_size(rng, long_side)
        image = render_image(findings, anatomy, height, width, rng)
        kind = "frontal" if view.frontal else "lateral"
        relative = f"CheXpert-v1.0-small/{split}/patient{index + 1:05d}/study1/view{number}_{kind}.jpg"
        layouts.atomic_write_bytes(root / relative, layouts.jpg_bytes(layouts.to_uint8(image.pixels, image.max_value)))
        rows.append((split, (relative, sex, age, "Frontal" if view.frontal else "Lateral", view.value if view.frontal else "",
                             *(layouts.format_label(labels[name]) for name in layouts.CHEXPERT_ORDER))))
    return rows


def _uuid(rng: np.random.Generator) -> str:
    h = "".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=4, dtype=np.uint64))
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


def rsna_image(index: int, config: SyntheticConfig) -> tuple[list[tuple], tuple]:
    """One RSNA image: pneumonia opacities (boxes from their region masks) or none."""
    rng = stream_rng(config.seed, Stream.RSNA, index)
    patient = _uuid(rng)
    airspace = (Label.PNEUMONIA, Label.CONSOLIDATION, Label.LUNG_OPACITY)
    findings = _eval_findings(rng, drop=airspace, uncertain=False)
    positive = rng.random() < 0.4
    if positive:
        first = sample_finding(Label.PNEUMONIA, Certainty.POSITIVE, rng)
        findings.append(first)
        if rng.random() < 0.5:  # a second opacity, in the other lung
            other = Laterality.LEFT if first.laterality is Laterality.RIGHT else Laterality.RIGHT
            findings.append(dataclasses.replace(sample_finding(Label.PNEUMONIA, Certainty.POSITIVE, rng), laterality=other))
    size = min(config.image_size, 1024)
    view = View.AP if rng.random() < 0.5 else View.PA
    anatomy = study_anatomy(findings, view, rng)
    image = render_image(findings, anatomy, size, size, rng, keep_masks=lambda f: f.label is Label.PNEUMONIA)
    pixels = layouts.to_uint8(image.pixels, image.max_value)
    fields = layouts.DicomFields(
        patient_id=patient, study_uid=layouts.deterministic_uid(config.seed, "rsna-study", index),
        series_uid=layouts.deterministic_uid(config.seed, "rsna-series", index),
        sop_uid=layouts.deterministic_uid(config.seed, "rsna-sop", index), view_position=view.value, modality="CR",
    )
    root = Path(config.out) / "rsna"
    layouts.atomic_write_bytes(root / "stage_2_train_images" / f"{patient}.dcm", layouts.dicom_bytes(pixels, fields, bits_stored=8, photometric="MONOCHROME2"))
    rows = []
    for mask in image.finding_masks.values():
        ys, xs = np.nonzero(mask)
        rows.append((patient, float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1), 1))
    if not rows:
        rows.append((patient, None, None, None, None, 0))
    abnormal = any(f.certainty is Certainty.POSITIVE for f in findings)
    kind = "Lung Opacity" if rows[0][5] == 1 else ("No Lung Opacity / Not Normal" if abnormal else "Normal")
    return rows, (patient, kind)


def siim_image(index: int, config: SyntheticConfig) -> list[tuple[str, str]]:
    """One SIIM image: pneumothorax regions (one RLE row each) or a single "-1" row."""
    rng = stream_rng(config.seed, Stream.SIIM, index)
    findings = _eval_findings(rng, drop=(Label.PNEUMOTHORAX,), uncertain=False)
    if rng.random() < 0.35:
        first = sample_finding(Label.PNEUMOTHORAX, Certainty.POSITIVE, rng)
        findings.append(first)
        if rng.random() < 0.2:
            other = Laterality.LEFT if first.laterality is Laterality.RIGHT else Laterality.RIGHT
            findings.append(dataclasses.replace(sample_finding(Label.PNEUMOTHORAX, Certainty.POSITIVE, rng), laterality=other))
    size = min(config.image_size, 1024)
    anatomy = study_anatomy(findings, View.PA, rng)
    image = render_image(findings, anatomy, size, size, rng, keep_masks=lambda f: f.label is Label.PNEUMOTHORAX)
    base = f"1.2.276.0.7230010.3.1.{{}}.8323329.{1000 + index}.{1517875000 + int(rng.integers(0, 99999))}.{int(rng.integers(100000, 999999))}"
    image_id, study_uid, series_uid = base.format(4), base.format(2), base.format(3)
    fields = layouts.DicomFields(patient_id=layouts.deterministic_uid(config.seed, "siim-patient", index)[-12:], study_uid=study_uid,
                                 series_uid=series_uid, sop_uid=image_id, view_position="PA", modality="CR")
    pixels = layouts.to_uint8(image.pixels, image.max_value)
    path = Path(config.out) / "siim" / "dicom-images-train" / study_uid / series_uid / f"{image_id}.dcm"
    layouts.atomic_write_bytes(path, layouts.dicom_bytes(pixels, fields, bits_stored=8, photometric="MONOCHROME2"))
    masks = list(image.finding_masks.values())
    if not masks:
        return [(image_id, "-1")]
    # Overlap-free regions: a pixel belongs to the first pneumothorax that claims it.
    claimed = np.zeros_like(masks[0])
    rows = []
    for mask in masks:
        own = mask & ~claimed
        claimed |= own
        rows.append((image_id, layouts.rle_encode(own)))
    return rows


def _progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    return tqdm(items, total=total, desc=desc, unit="img" if "eval" in desc else "study", disable=not enabled)


def _chexpert_worker(args: tuple[int, int, SyntheticConfig]) -> list[tuple]:
    return chexpert_image(*args)


def _rsna_worker(args: tuple[int, SyntheticConfig]) -> tuple[list[tuple], tuple]:
    return rsna_image(*args)


def _siim_worker(args: tuple[int, SyntheticConfig]) -> list[tuple[str, str]]:
    return siim_image(*args)


def write_eval_sets(config: SyntheticConfig, pool: Pool | None = None) -> None:
    """CheXpert-v1.0-small (N), RSNA (max(8, N/2)) and SIIM (max(8, N/2)) style sets."""
    root = Path(config.out)
    total = config.resolved_eval_images()
    rows = {"train": [], "valid": []}
    items = [(i, total, config) for i in range(total)]
    for result in _progress(_ordered_map(_chexpert_worker, items, pool), total, "eval chexpert", config.progress):
        for split, row in result:
            rows[split].append(row)
    for split, split_rows in rows.items():
        layouts.write_csv(root / "chexpert" / "CheXpert-v1.0-small" / f"{split}.csv", layouts.CHEXPERT_COLUMNS, split_rows)

    count = max(8, total // 2)
    label_rows, class_rows = [], []
    items = [(i, config) for i in range(count)]
    for boxes, info in _progress(_ordered_map(_rsna_worker, items, pool), count, "eval rsna", config.progress):
        label_rows += boxes
        class_rows.append(info)
    layouts.write_csv(root / "rsna" / "stage_2_train_labels.csv", layouts.RSNA_COLUMNS, label_rows)
    layouts.write_csv(root / "rsna" / "stage_2_detailed_class_info.csv", layouts.RSNA_CLASS_COLUMNS, class_rows)

    lines = [layouts.SIIM_HEADER]
    for result in _progress(_ordered_map(_siim_worker, items, pool), count, "eval siim", config.progress):
        lines += [f"{image_id}, {rle}" for image_id, rle in result]
    layouts.atomic_write_bytes(root / "siim" / "train-rle.csv", ("\n".join(lines) + "\n").encode())


def generate(config: SyntheticConfig) -> Path:
    """Write the whole synthetic dataset under ``config.out``; returns that folder."""
    config.validate()
    root = Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    tasks = plan_studies(config)
    items = [(task, config) for task in tasks]
    with contextlib.ExitStack() as stack:
        pool = None
        if config.workers > 1:
            # spawn: workers never inherit locks or thread pools of the parent (safe with torch loaded).
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(config.workers))
        results = list(_progress(_ordered_map(_mimic_worker, items, pool), len(tasks), "studies", config.progress))
        write_mimic_tables(root, results, tasks, config)
        if config.eval_sets:
            write_eval_sets(config, pool)
    return root
