"""Pack MIMIC-CXR image/report pairs into WebDataset shards: parallel, deterministic, resumable.

Guarantees (docs/ARCHITECTURE.md, "Shard sample"):

* **Deterministic.** Samples are ordered by split (train, validate, test, others) and then by
  (subject_id, study_id, dicom_id). Workers only decode and encode; the parent process consumes
  their results *in plan order* (``Pool.imap``) and is the only tar writer, so shard boundaries
  depend on the sample sequence alone, never on worker count or timing. Tar members have
  mtime 0, uid/gid 0, fixed user/group names and mode; PNG/JPEG settings are fixed. The same
  inputs and options therefore give byte-identical shards, manifest and dataset.json.
* **Bounded shards.** A shard is closed before a sample that would exceed ``shard_size`` samples
  or ``max_shard_bytes`` bytes (tar headers, padding and the end-of-archive record included).
* **Resumable.** A shard is written as ``<name>.tar.tmp`` and renamed when complete; then a
  sidecar ``.mlip_state/<name>.json`` records its samples, their checksums, its byte size, the
  skipped inputs of its range and the plan index to resume from. A re-run with the same inputs
  and options keeps every complete shard (sidecar present and tar size matching) and writes the
  rest; the result is byte-identical to an uninterrupted run. Different options or inputs in an
  existing output folder are refused (a plan fingerprint is stored) unless ``overwrite``.
* **Accounted.** Every skipped input is a line of ``errors.jsonl`` (file, key, reason, detail);
  ``non_utf8_report`` lines are warnings (decoded with ``errors="replace"`` and packed).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlip_dist.data.dicom import ImageReadError, SkipReason
from mlip_dist.data.imaging import ImageFormat, Resample
from mlip_dist.data.mimic import (
    REGIONS_DIR,
    ImageRecord,
    ImagesPerStudy,
    Issue,
    Labeler,
    RegionInfo,
    check_split_name,
    fill_missing_views,
    load_metadata,
    load_regions,
    read_report,
    select_images,
    split_rank,
)
from mlip_dist.data.reports import normalise_sentence, split_sentences

FORMAT_VERSION = 1
STATE_DIR = ".mlip_state"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to a multiple of this
TAR_USER = "mlip"
TAR_MODE = 0o444


class StartMethod(str, enum.Enum):
    SPAWN = "spawn"
    FORK = "fork"
    FORKSERVER = "forkserver"


@dataclass
class PackOptions:
    """Every option of tools/make_shards.py (the ones that change the output are fingerprinted)."""

    root: Path
    out: Path
    reports_root: Path | None = None
    csv_root: Path | None = None
    workers: int = 1
    size: int = 512
    views: tuple[str, ...] = ("PA", "AP")
    image_format: ImageFormat = ImageFormat.PNG
    bit_depth: int = 8
    resample: Resample = Resample.AREA
    shard_size: int = 1000
    max_shard_bytes: int = 2**30
    images_per_study: ImagesPerStudy = ImagesPerStudy.ONE
    labeler: Labeler = Labeler.CHEXPERT
    splits: tuple[str, ...] | None = None  # None = every split found
    limit: int | None = None
    max_sentences: int = 16
    min_words: int = 2
    max_error_frac: float = 0.05
    start_method: StartMethod = StartMethod.SPAWN
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        problems = []
        if self.size < 1:
            problems.append("--size must be >= 1")
        if self.bit_depth not in (8, 16):
            problems.append("--bit-depth must be 8 or 16")
        if self.image_format is ImageFormat.JPG and self.bit_depth != 8:
            problems.append("--image-format jpg stores 8-bit images; use --bit-depth 8 or png")
        if self.shard_size < 1:
            problems.append("--shard-size must be >= 1")
        if self.max_shard_bytes < TAR_RECORD:
            problems.append(f"--max-shard-bytes must be >= {TAR_RECORD} (one tar record)")
        if self.workers < 1:
            problems.append("--workers must be >= 1")
        if not self.views:
            problems.append("--views must name at least one view")
        if not 0.0 <= self.max_error_frac <= 1.0:
            problems.append("--max-error-frac must be in [0, 1]")
        if not self.root.is_dir():
            problems.append(f"--root {self.root} is not a folder")
        if self.reports_root is not None and not self.reports_root.is_dir():
            problems.append(f"--reports-root {self.reports_root} is not a folder")
        if problems:
            raise ValueError("; ".join(problems))

    def output_settings(self) -> dict[str, Any]:
        """Options that change the bytes written (recorded in dataset.json and the fingerprint)."""
        return {
            "size": self.size,
            "views": list(self.views),
            "image_format": self.image_format.value,
            "bit_depth": self.bit_depth,
            "resample": self.resample.value,
            "shard_size": self.shard_size,
            "max_shard_bytes": self.max_shard_bytes,
            "images_per_study": self.images_per_study.value,
            "labeler": self.labeler.value,
            "splits": list(self.splits) if self.splits else None,
            "limit": self.limit,
            "max_sentences": self.max_sentences,
            "min_words": self.min_words,
        }


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs besides the task (sent once, through the pool initializer)."""

    root: str
    size: int
    image_format: ImageFormat
    bit_depth: int
    resample: Resample


@dataclass(frozen=True)
class SampleTask:
    """One planned sample: everything but the pixels."""

    index: int
    split: str
    key: str
    image_path: str  # relative to root
    meta: dict[str, Any]  # json fields known before decoding
    text: str
    region: RegionInfo | None


@dataclass
class EncodedSample:
    index: int
    key: str
    members: dict[str, bytes] | None  # extension -> bytes; None when skipped
    issue: Issue | None = None


@dataclass
class PackSummary:
    packed: int = 0
    skipped: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    filtered_view: int = 0
    shards: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def error_fraction(self) -> float:
        total = self.packed + self.n_skipped
        return self.n_skipped / total if total else 1.0

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        warns = ", ".join(f"{k}={v}" for k, v in sorted(self.warnings.items())) or "none"
        return (
            f"packed {self.packed} | skipped {self.n_skipped} ({reasons}) | warnings ({warns}) | "
            f"filtered by view/selection {self.filtered_view} | shards {self.shards} "
            f"({self.resumed_shards} kept from a previous run) | {self.seconds:.1f} s"
        )


# --------------------------------------------------------------------------- worker side

_SETTINGS: EncodeSettings | None = None


def _init_worker(settings: EncodeSettings) -> None:
    global _SETTINGS
    _SETTINGS = settings
    # Each worker is one process; nested BLAS/OpenMP threads would only fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_sample(task: SampleTask, settings: EncodeSettings | None = None) -> EncodedSample:
    """Decode, resize and encode one image and build its members (runs in a worker).

    Known input faults become an ``EncodedSample`` with ``issue`` set; anything else is a bug
    and propagates.
    """
    from mlip_dist.data.dicom import read_dicom
    from mlip_dist.data.imaging import (
        encode,
        quantize,
        read_mask,
        read_raster,
        resize_mask,
        resize_shorter_side,
    )

    settings = settings or _SETTINGS
    assert settings is not None, "encode_sample needs settings (pool initializer not run)"
    path = Path(settings.root) / task.image_path
    try:
        if path.suffix.lower() == ".dcm":
            pixels = read_dicom(path).pixels
        else:
            pixels = read_raster(path)
    except ImageReadError as err:
        return EncodedSample(
            task.index, task.key, None, Issue(task.image_path, err.reason, err.detail, task.key)
        )
    orig_h, orig_w = pixels.shape
    stored = quantize(resize_shorter_side(pixels, settings.size, settings.resample), settings.bit_depth)
    ext = settings.image_format.value
    members: dict[str, bytes] = {ext: encode(stored, settings.image_format)}
    meta = dict(task.meta)
    meta["orig_size"] = [int(orig_h), int(orig_w)]
    if task.region is not None:
        mask_path = Path(settings.root) / task.region.mask_path
        try:
            mask = read_mask(mask_path)
        except (OSError, ValueError, SyntaxError) as err:
            return EncodedSample(
                task.index,
                task.key,
                None,
                Issue(task.region.mask_path, SkipReason.BAD_REGIONS, f"cannot read mask ({err})", task.key),
            )
        if mask.shape != (orig_h, orig_w):
            return EncodedSample(
                task.index,
                task.key,
                None,
                Issue(
                    task.region.mask_path,
                    SkipReason.BAD_REGIONS,
                    f"mask is {mask.shape[0]}x{mask.shape[1]}, image is {orig_h}x{orig_w}",
                    task.key,
                ),
            )
        members["regions.png"] = encode(resize_mask(mask, *stored.shape), ImageFormat.PNG)
        meta["regions"] = dict(sorted(task.region.regions.items()))
        meta["sentence_findings"] = [
            list(task.region.sentence_findings.get(normalise_sentence(s), [])) for s in meta["sentences"]
        ]
    members["txt"] = task.text.encode("utf-8")
    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return EncodedSample(task.index, task.key, members)


def _encode_in_worker(task: SampleTask) -> EncodedSample:
    return encode_sample(task)


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    tasks: list[SampleTask]
    issues: list[Issue]  # skipped (and warned) before packing, in plan order
    filtered_view: int
    info: dict[str, Any]

    def fingerprint(self, options: PackOptions) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(options.output_settings(), sort_keys=True).encode())
        for task in self.tasks:
            digest.update(f"{task.split}\t{task.key}\t{task.image_path}\t{task.text}\n".encode())
        return digest.hexdigest()


def _pool(options: PackOptions, settings: EncodeSettings | None = None):
    context = multiprocessing.get_context(options.start_method.value)
    if settings is None:
        return context.Pool(options.workers)
    return context.Pool(options.workers, initializer=_init_worker, initargs=(settings,))


def _parallel_map(options: PackOptions, fn, items: list[Any], desc: str) -> list[Any]:
    from tqdm import tqdm

    if options.workers == 1 or len(items) < 64:
        return [fn(item) for item in tqdm(items, desc=desc, disable=not options.progress, unit="file")]
    with _pool(options) as pool:
        return list(
            tqdm(
                pool.imap(fn, items, chunksize=64), total=len(items), desc=desc, disable=not options.progress
            )
        )


def build_plan(options: PackOptions) -> Plan:
    """Read the CSVs and reports and decide which sample goes where (no pixels are read, except
    DICOM headers for images whose view no CSV gives)."""
    root = options.root
    reports_root = options.reports_root or root
    metadata = load_metadata(root, reports_root, options.csv_root, options.labeler)
    issues = list(metadata.issues)
    records = metadata.records
    if options.splits:
        records = [r for r in records if r.split in options.splits]
    header_issues = fill_missing_views(
        records,
        root,
        map_fn=lambda fn, items: iter(_parallel_map(options, fn, list(items), "DICOM views")),
    )
    issues.extend(header_issues)
    # Only records whose header could not be read are dropped here; CSV-level issues (duplicates,
    # unsafe paths) never entered ``records``, and their key may be shared with a good record.
    failed_headers = {i.key for i in header_issues}
    records = [r for r in records if r.key not in failed_headers]
    selected, filtered = select_images(
        records, tuple(v.upper() for v in options.views), options.images_per_study
    )
    selected.sort(key=lambda r: (split_rank(r.split or "train"), r.sort_key))
    if options.limit is not None:
        selected = selected[: options.limit]

    reports = _parallel_map(
        options, read_report, [str(reports_root / r.report_path) for r in selected], "reports"
    )
    regions = load_regions(root)
    tasks: list[SampleTask] = []
    for record, report in zip(selected, reports, strict=True):
        if report.non_utf8:
            issues.append(
                Issue(
                    record.report_path,
                    SkipReason.NON_UTF8_REPORT,
                    "not valid UTF-8; decoded with errors='replace' (U+FFFD) and packed",
                    record.key,
                    warning=True,
                )
            )
        if report.issue is not None:
            issues.append(Issue(record.report_path, report.issue[0], report.issue[1], record.key))
            continue
        assert report.sections is not None
        region = regions.get(record.dicom_id)
        if region is None and regions and (root / REGIONS_DIR / f"{record.dicom_id}.png").is_file():
            region = RegionInfo(f"{REGIONS_DIR}/{record.dicom_id}.png", {}, {})  # a mask with no finding
        tasks.append(_make_task(len(tasks), record, report.sections, options, region))
    info = {
        "csv_files": metadata.csv_files,
        "split_source": metadata.split_source,
        "view_source": metadata.view_source,
        "regions": bool(regions),
    }
    return Plan(tasks, issues, filtered, info)


def _make_task(
    index: int, record: ImageRecord, sections, options: PackOptions, region: RegionInfo | None
) -> SampleTask:
    split = check_split_name(record.split or "train")
    text = sections.text
    meta = {
        "subject_id": record.subject_id,
        "study_id": record.study_id,
        "dicom_id": record.dicom_id,
        "split": split,
        "view": record.view,
        "findings": sections.findings,
        "impression": sections.impression,
        "sentences": split_sentences(text, options.max_sentences, options.min_words),
        "labels": record.labels,
        "source": record.image_path,
        "report_source": record.report_path,
        "sections_from_headings": sections.from_headings,
    }
    return SampleTask(index, split, record.key, record.image_path, meta, text, region)


# --------------------------------------------------------------------------- writing


def tar_member_bytes(size: int) -> int:
    """Bytes one member takes in a ustar archive: a header block plus the data padded to blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(members_bytes: int) -> int:
    """Final archive size: members, two zero end blocks, padded to tarfile's record size."""
    return -(-(members_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class _ShardStream:
    """The one open shard of a split; closed atomically (tmp, fsync, rename, then sidecar)."""

    def __init__(self, out: Path, split: str, index: int, first_task: int) -> None:
        import webdataset as wds

        self.out, self.split, self.index, self.first_task = out, split, index, first_task
        self.name = shard_name(split, index)
        self.tmp = out / (self.name + ".tmp")
        self.handle = open(self.tmp, "wb")
        self.writer = wds.TarWriter(
            self.handle, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, encoder=False, mtime=0
        )
        self.member_bytes = 0
        self.samples: list[dict[str, Any]] = []
        self.issues: list[dict[str, Any]] = []

    def fits(self, sample_bytes: int, shard_size: int, max_bytes: int) -> bool:
        if not self.samples:
            return True  # a single oversized sample still gets a shard of its own
        return (
            len(self.samples) < shard_size and tar_file_bytes(self.member_bytes + sample_bytes) <= max_bytes
        )

    def add(self, sample: EncodedSample, split: str) -> None:
        assert sample.members is not None
        self.writer.write({"__key__": sample.key, **sample.members})
        self.member_bytes += sum(tar_member_bytes(len(v)) for v in sample.members.values())
        meta = json.loads(sample.members["json"])
        member_sha = {ext: _sha256(data) for ext, data in sorted(sample.members.items())}
        self.samples.append(
            {
                "key": sample.key,
                "shard": self.name,
                "split": split,
                "labels": meta["labels"],
                "n_sentences": len(meta["sentences"]),
                "member_sha256": member_sha,
                "sample_sha256": _sha256("".join(f"{k}:{v};" for k, v in member_sha.items()).encode()),
            }
        )

    def close(self, next_task: int) -> dict[str, Any]:
        self.writer.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        final = self.out / self.name
        os.replace(self.tmp, final)
        record = {
            "shard": self.name,
            "split": self.split,
            "bytes": final.stat().st_size,
            "first_task": self.first_task,
            "next_task": next_task,
            "samples": self.samples,
            "issues": self.issues,
        }
        _atomic_write(
            self.out / STATE_DIR / (self.name + ".json"), json.dumps(record, sort_keys=True).encode()
        )
        return record


def _complete_shards(out: Path, split: str) -> list[dict[str, Any]]:
    """Sidecars of the leading run of complete shards of a split (tar present, size matching)."""
    done: list[dict[str, Any]] = []
    index = 0
    while True:
        name = shard_name(split, index)
        sidecar = out / STATE_DIR / (name + ".json")
        tar = out / name
        if not sidecar.is_file() or not tar.is_file():
            return done
        record = json.loads(sidecar.read_text())
        if tar.stat().st_size != record["bytes"]:
            return done
        done.append(record)
        index += 1


def _prepare_out(options: PackOptions, fingerprint: str) -> None:
    out = options.out
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    stamp = state / "fingerprint"
    if stamp.is_file() and stamp.read_text().strip() != fingerprint:
        if not options.overwrite:
            raise ValueError(
                f"{out} holds shards made from other inputs or options (fingerprint mismatch); "
                "use a new --out folder or pass --overwrite"
            )
        for path in [*out.glob("*.tar"), *out.glob("*.tar.tmp"), *state.glob("*.json")]:
            path.unlink()
    for stale in out.glob("*.tmp"):
        stale.unlink()  # left by a killed run; its shard is rewritten
    _atomic_write(stamp, (fingerprint + "\n").encode())


def _iter_encoded(
    options: PackOptions, settings: EncodeSettings, tasks: list[SampleTask]
) -> Iterator[EncodedSample]:
    if options.workers == 1:
        for task in tasks:
            yield encode_sample(task, settings)
        return
    with _pool(options, settings) as pool:
        # imap keeps plan order whatever the worker timing; chunksize 1 keeps the pipeline shallow.
        yield from pool.imap(_encode_in_worker, tasks, chunksize=1)


def pack(options: PackOptions) -> PackSummary:
    """Plan, encode and write all shards, the manifest, dataset.json and errors.jsonl."""
    from tqdm import tqdm

    start = time.perf_counter()
    options.validate()
    plan = build_plan(options)
    fingerprint = plan.fingerprint(options)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out(options, fingerprint)

    splits = sorted({t.split for t in plan.tasks}, key=split_rank)
    by_split = {s: [t for t in plan.tasks if t.split == s] for s in splits}
    finished: dict[str, list[dict[str, Any]]] = {}
    todo: list[SampleTask] = []
    resume_at: dict[str, tuple[int, int]] = {}  # split -> (next shard index, next task index)
    summary = PackSummary(filtered_view=plan.filtered_view)
    for split in splits:
        done = _complete_shards(out, split)
        tasks = by_split[split]
        next_task = done[-1]["next_task"] if done else tasks[0].index
        if done and next_task > tasks[-1].index + 1:
            done = []  # cannot happen with a matching fingerprint; be safe and rewrite
            next_task = tasks[0].index
        finished[split] = done
        summary.resumed_shards += len(done)
        resume_at[split] = (len(done), next_task)
        todo.extend(t for t in tasks if t.index >= next_task)

    settings = EncodeSettings(
        str(options.root), options.size, options.image_format, options.bit_depth, options.resample
    )
    split_of = {t.index: t.split for t in todo}
    last_index = {s: by_split[s][-1].index for s in splits}
    current: dict[str, _ShardStream | None] = {s: None for s in splits}
    pending_issues: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    progress = tqdm(total=len(todo), desc="packing", unit="img", disable=not options.progress)
    for sample in _iter_encoded(options, settings, todo):
        split = split_of[sample.index]
        stream = current[split]
        if sample.members is not None:
            size = sum(tar_member_bytes(len(v)) for v in sample.members.values())
            if stream is not None and not stream.fits(size, options.shard_size, options.max_shard_bytes):
                finished[split].append(stream.close(next_task=sample.index))
                stream = None
            if stream is None:
                shard_index, _ = resume_at[split]
                stream = _ShardStream(out, split, shard_index, sample.index)
                resume_at[split] = (shard_index + 1, sample.index)
                stream.issues.extend(pending_issues[split])
                pending_issues[split] = []
            stream.add(sample, split)
        else:
            assert sample.issue is not None
            (stream.issues if stream is not None else pending_issues[split]).append(sample.issue.to_json())
        current[split] = stream
        if sample.index == last_index[split] and stream is not None:
            stream.issues.extend(pending_issues[split])
            pending_issues[split] = []
            finished[split].append(stream.close(next_task=sample.index + 1))
            current[split] = None
        progress.update(1)
    progress.close()

    trailing = [issue for split in splits for issue in pending_issues[split]]  # splits whose tail failed
    _write_outputs(options, plan, finished, splits, trailing, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_outputs(
    options: PackOptions,
    plan: Plan,
    finished: dict[str, list[dict[str, Any]]],
    splits: list[str],
    trailing: list[dict[str, Any]],
    summary: PackSummary,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = options.out
    # A trailing failed run of samples leaves no shard to hold its issues; keep them in state too.
    _atomic_write(out / STATE_DIR / "trailing_issues.json", json.dumps(trailing, sort_keys=True).encode())
    issue_lines = [i.to_json() for i in plan.issues]
    rows: list[dict[str, Any]] = []
    for split in splits:
        for record in finished[split]:
            issue_lines.extend(record["issues"])
            rows.extend(record["samples"])
    issue_lines.extend(trailing)
    _atomic_write(
        out / "errors.jsonl",
        "".join(json.dumps(line, sort_keys=True) + "\n" for line in issue_lines).encode(),
    )
    for line in issue_lines:
        target = summary.warnings if line["severity"] == "warning" else summary.skipped
        target[line["reason"]] += 1
    summary.packed = len(rows)
    summary.shards = sum(len(finished[s]) for s in splits)

    labels_type = pa.struct([(name, pa.int8()) for name in _label_names()])
    table = pa.table(
        {
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "shard": pa.array([r["shard"] for r in rows], pa.string()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "labels": pa.array([r["labels"] for r in rows], labels_type),
            "n_sentences": pa.array([r["n_sentences"] for r in rows], pa.int32()),
            "member_sha256": pa.array(
                [json.dumps(r["member_sha256"], sort_keys=True) for r in rows], pa.string()
            ),
            "sample_sha256": pa.array([r["sample_sha256"] for r in rows], pa.string()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    _atomic_write(out / "manifest.parquet", buffer.getvalue())

    dataset = {
        "format_version": FORMAT_VERSION,
        "created_by": "mlip_dist tools/make_shards.py",
        "options": options.output_settings(),
        "inputs": plan.info,
        "splits": {
            split: {
                "shards": [r["shard"] for r in finished[split]],
                "num_samples": sum(len(r["samples"]) for r in finished[split]),
                "shard_bytes": [r["bytes"] for r in finished[split]],
                # samples per shard, parallel to "shards": the training loader's global order needs them
                "shard_samples": [len(r["samples"]) for r in finished[split]],
            }
            for split in splits
        },
        "members": [options.image_format.value, "txt", "json"]
        + (["regions.png"] if plan.info["regions"] else []),
        "counts": {
            "packed": summary.packed,
            "skipped": dict(sorted(summary.skipped.items())),
            "warnings": dict(sorted(summary.warnings.items())),
            "filtered_by_view_or_selection": summary.filtered_view,
        },
    }
    _atomic_write(out / "dataset.json", (json.dumps(dataset, indent=2, sort_keys=True) + "\n").encode())


def _label_names() -> tuple[str, ...]:
    from mlip_dist.data.mimic import CHEXPERT_LABELS

    return CHEXPERT_LABELS


def options_from_dict(data: dict[str, Any]) -> PackOptions:
    """Inverse of ``dataclasses.asdict`` for PackOptions (used by tests and the benchmark)."""
    return PackOptions(**{f.name: data[f.name] for f in dataclasses.fields(PackOptions) if f.name in data})
