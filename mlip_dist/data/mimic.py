"""MIMIC-CXR metadata: the PhysioNet CSVs (read with pyarrow), reports and record selection.

Both releases are read exactly as PhysioNet ships them, ``.csv`` or ``.csv.gz``:

* MIMIC-CXR 2.0.0 (DICOM): ``cxr-record-list.csv.gz`` (subject_id, study_id, dicom_id, path to
  ``files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm``) and ``cxr-study-list.csv.gz`` (subject_id,
  study_id, path to the report ``files/pNN/pNNNNNNNN/sNNNNNNNN.txt``).
* MIMIC-CXR-JPG 2.x: ``mimic-cxr-2.0.0-metadata.csv.gz`` (dicom_id, subject_id, study_id,
  ViewPosition, ...), ``-split.csv.gz``, ``-chexpert.csv.gz``, ``-negbio.csv.gz``; images at
  ``files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg``. Reports come from the DICOM release
  (``reports_root``).

Images are listed by the record list when one is found, else by the metadata CSV. The view is the
metadata CSV's ViewPosition; without a metadata row, the DICOM header (see
:func:`mlip_dist.data.dicom.read_view_position`). The split is the split CSV's, kept as is
(train / validate / test are never merged); without a split CSV every image is "train" and
``split_source`` says so.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mlip_dist.data.dicom import SkipReason
from mlip_dist.data.reports import ReportSections, parse_report

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
SPLIT_ORDER: tuple[str, ...] = ("train", "validate", "test")
REGIONS_CSV = "mlip-synthetic-regions.csv.gz"
REGIONS_DIR = "regions"


class ImagesPerStudy(str, enum.Enum):
    ONE = "one"
    ALL = "all"


class Labeler(str, enum.Enum):
    CHEXPERT = "chexpert"
    NEGBIO = "negbio"


class MetadataError(RuntimeError):
    """The input folder does not hold the CSVs needed; the message says which and where."""


@dataclass
class ImageRecord:
    """One image of one study, with everything known before pixels are read."""

    subject_id: int
    study_id: int
    dicom_id: str
    image_path: str  # relative to the image root
    report_path: str  # relative to the reports root
    view: str | None = None
    split: str | None = None
    labels: dict[str, int | None] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.subject_id}_{self.study_id}_{self.dicom_id}"

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (self.subject_id, self.study_id, self.dicom_id)


@dataclass(frozen=True)
class Issue:
    """An input that was skipped (or, for warnings, packed with a note); one errors.jsonl line."""

    file: str
    reason: SkipReason
    detail: str
    key: str | None = None
    warning: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "key": self.key,
            "reason": self.reason.value,
            "detail": self.detail,
            "severity": "warning" if self.warning else "skipped",
        }


@dataclass
class Metadata:
    records: list[ImageRecord]
    issues: list[Issue]
    csv_files: dict[str, str]  # role -> path used
    split_source: str
    view_source: str


def find_csv(dirs: Iterable[Path], patterns: Iterable[str]) -> Path | None:
    """First file matching a pattern (``.csv.gz`` or ``.csv``) in the first dir that has one.

    Within a dir, the lexicographically last match wins, so ``mimic-cxr-2.1.0-...`` beats 2.0.0.
    """
    for folder in dirs:
        if not folder.is_dir():
            continue
        for pattern in patterns:
            hits = sorted(p for ext in (".csv.gz", ".csv") for p in folder.glob(pattern + ext))
            if hits:
                return hits[-1]
    return None


def read_csv(path: Path, string_columns: Iterable[str] = ("dicom_id", "path", "split", "ViewPosition")):
    """Read a (gzipped) CSV with pyarrow; id-like text columns are forced to strings."""
    import pyarrow.csv as pacsv

    column_types: dict[str, Any] = {}
    import pyarrow as pa

    for name in string_columns:
        column_types[name] = pa.string()
    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=column_types))
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid subclasses ValueError
        raise MetadataError(f"{path}: cannot read CSV ({err})") from err


def _columns(table, path: Path, needed: Iterable[str]) -> dict[str, list[Any]]:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise MetadataError(
            f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(table.column_names)}"
        )
    return {c: table.column(c).to_pylist() for c in needed}


def image_rel_path(subject_id: int, study_id: int, dicom_id: str, ext: str) -> str:
    """PhysioNet layout: files/p<first 2 digits>/p<subject>/s<study>/<dicom_id><ext>."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}{ext}"


def report_rel_path(subject_id: int, study_id: int) -> str:
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}.txt"


def _label_value(value: Any) -> int | None:
    if value is None:
        return None
    number = float(value)
    if number != number:  # NaN
        return None
    return int(number)


_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # dicom_id becomes a tar member prefix: no '/', '.', '..'


def unsafe_relative_path(path: str) -> str | None:
    """Why ``path`` (read from a CSV) could leave the folder it is relative to, or None if it cannot.

    Rejected: empty, absolute (POSIX or Windows drive/UNC), any ``..`` component, backslashes, NUL.
    Symbolic links inside the data root are the data owner's choice and are followed.
    """
    if not path:
        return "empty path"
    if "\x00" in path:
        return "path contains a NUL byte"
    if "\\" in path:
        return f"path {path!r} contains a backslash"
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive:
        return f"path {path!r} is absolute; CSV paths must be relative to the data root"
    if ".." in PurePosixPath(path).parts:
        return f"path {path!r} has a '..' component and could escape the data root"
    return None


def _unsafe_record(record: ImageRecord) -> tuple[str, str] | None:
    """(offending value, why) when a record's id or paths are unsafe, else None."""
    if not _SAFE_ID_RE.match(record.dicom_id or ""):
        return record.dicom_id or "", f"dicom_id {record.dicom_id!r} is not [A-Za-z0-9_-]+ (it names tar members)"
    for field_name, value in (("image", record.image_path), ("report", record.report_path)):
        why = unsafe_relative_path(value or "")
        if why is not None:
            return value or "", f"{field_name} {why}"
    return None


def load_metadata(
    root: Path,
    reports_root: Path | None = None,
    csv_root: Path | None = None,
    labeler: Labeler = Labeler.CHEXPERT,
) -> Metadata:
    """List every image with its ids, paths, view (when a CSV has it), split and labels.

    Search order for CSVs: ``csv_root``, then ``root``, then ``reports_root``. Raises
    :class:`MetadataError` when neither a record list nor a metadata CSV is found.
    """
    reports_root = reports_root or root
    dirs = [d for d in (csv_root, root, reports_root) if d is not None]
    record_csv = find_csv(dirs, ["cxr-record-list"])
    study_csv = find_csv(dirs, ["cxr-study-list"])
    meta_csv = find_csv(dirs, ["mimic-cxr-*-metadata"])
    split_csv = find_csv(dirs, ["mimic-cxr-*-split"])
    label_csv = find_csv(dirs, [f"mimic-cxr-*-{labeler.value}"])
    used = {
        role: str(p)
        for role, p in (
            ("record_list", record_csv),
            ("study_list", study_csv),
            ("metadata", meta_csv),
            ("split", split_csv),
            ("labels", label_csv),
        )
        if p is not None
    }
    if record_csv is None and meta_csv is None:
        raise MetadataError(
            f"no cxr-record-list.csv[.gz] (MIMIC-CXR) or mimic-cxr-*-metadata.csv[.gz] (MIMIC-CXR-JPG) "
            f"in {', '.join(str(d) for d in dirs)}; pass --csv-root to the folder that holds them"
        )
    issues: list[Issue] = []

    views: dict[str, str | None] = {}
    meta_rows: list[tuple[int, int, str]] = []
    if meta_csv is not None:
        cols = _columns(read_csv(meta_csv), meta_csv, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
        for dicom_id, subject, study, view in zip(
            cols["dicom_id"], cols["subject_id"], cols["study_id"], cols["ViewPosition"], strict=True
        ):
            views[dicom_id] = (view or "").strip().upper() or None
            meta_rows.append((int(subject), int(study), dicom_id))

    report_paths: dict[int, str] = {}
    if study_csv is not None:
        cols = _columns(read_csv(study_csv), study_csv, ["subject_id", "study_id", "path"])
        report_paths = {int(s): p for s, p in zip(cols["study_id"], cols["path"], strict=True)}

    seen: set[str] = set()
    records: list[ImageRecord] = []

    def add(subject: int, study: int, dicom_id: str, image_path: str, source_csv: Path) -> None:
        record = ImageRecord(
            subject_id=subject,
            study_id=study,
            dicom_id=dicom_id,
            image_path=image_path,
            report_path=report_paths.get(study, report_rel_path(subject, study)),
        )
        unsafe = _unsafe_record(record)
        if unsafe is not None:
            source = study_csv if unsafe[1].startswith("report") and study_csv is not None else source_csv
            issues.append(Issue(unsafe[0], SkipReason.UNSAFE_PATH, f"{unsafe[1]} (from {source.name}); not read",
                                record.key if _SAFE_ID_RE.match(record.dicom_id) else None))
            return
        if record.dicom_id in seen:
            issues.append(
                Issue(
                    image_path,
                    SkipReason.DUPLICATE_KEY,
                    f"dicom_id listed again in {source_csv.name}",
                    record.key,
                )
            )
            return
        seen.add(record.dicom_id)
        records.append(record)

    if record_csv is not None:
        cols = _columns(read_csv(record_csv), record_csv, ["subject_id", "study_id", "dicom_id", "path"])
        for subject, study, dicom_id, path in zip(
            cols["subject_id"], cols["study_id"], cols["dicom_id"], cols["path"], strict=True
        ):
            add(int(subject), int(study), dicom_id, path, record_csv)
    else:
        assert meta_csv is not None
        for subject, study, dicom_id in meta_rows:
            add(subject, study, dicom_id, image_rel_path(subject, study, dicom_id, ".jpg"), meta_csv)

    for record in records:
        record.view = views.get(record.dicom_id)

    split_source = "none: every image is train"
    if split_csv is not None:
        cols = _columns(read_csv(split_csv), split_csv, ["dicom_id", "split"])
        splits = {d: (s or "").strip() for d, s in zip(cols["dicom_id"], cols["split"], strict=True)}
        split_source = str(split_csv)
        kept = []
        for record in records:
            split = splits.get(record.dicom_id)
            if split and not _SAFE_SPLIT_RE.match(split):
                issues.append(
                    Issue(
                        record.image_path,
                        SkipReason.UNSAFE_PATH,
                        f"split {split!r} in {split_csv.name} is not usable in a shard file name",
                        record.key,
                    )
                )
                continue
            if not split:
                issues.append(
                    Issue(
                        record.image_path,
                        SkipReason.MISSING_CSV_ROW,
                        f"no row in {split_csv.name}",
                        record.key,
                    )
                )
                continue
            record.split = split
            kept.append(record)
        records = kept
    else:
        for record in records:
            record.split = "train"

    if label_csv is not None:
        table = read_csv(label_csv, string_columns=())
        present = [name for name in CHEXPERT_LABELS if name in table.column_names]
        cols = _columns(table, label_csv, ["study_id", *present])
        labels_by_study = {
            int(study): {name: _label_value(cols[name][i]) for name in present}
            for i, study in enumerate(cols["study_id"])
        }
    else:
        labels_by_study = {}
    for record in records:
        found = labels_by_study.get(record.study_id, {})
        record.labels = {name: found.get(name) for name in CHEXPERT_LABELS}

    view_source = "metadata CSV" if meta_csv is not None else "DICOM header"
    return Metadata(records, issues, used, split_source, view_source)


def fill_missing_views(
    records: list[ImageRecord],
    root: Path,
    map_fn: Callable[[Callable[[str], Any], Iterable[str]], Iterator[Any]] = map,
) -> list[Issue]:
    """Read ViewPosition from DICOM headers for records without one (``map_fn`` may be pool.imap).

    Records whose header cannot be read or has no ViewPosition keep ``view=None`` and get an Issue.
    """
    todo = [r for r in records if r.view is None and r.image_path.lower().endswith(".dcm")]
    issues: list[Issue] = []
    paths = [str(root / r.image_path) for r in todo]
    for record, (view, error) in zip(todo, map_fn(header_view, paths), strict=True):
        if error is not None:
            issues.append(Issue(record.image_path, error[0], error[1], record.key))
        record.view = view
    return issues


def header_view(path: str) -> tuple[str | None, tuple[SkipReason, str] | None]:
    """Pool-friendly wrapper: (view, None) or (None, (reason, detail))."""
    from mlip_dist.data.dicom import ImageReadError, read_view_position

    try:
        return read_view_position(path), None
    except ImageReadError as err:
        return None, (err.reason, err.detail)


def select_images(
    records: list[ImageRecord], views: tuple[str, ...], per_study: ImagesPerStudy
) -> tuple[list[ImageRecord], int]:
    """Keep images whose view is in ``views``; with ``ONE``, per study the image whose view comes
    first in ``views`` (PA before AP by default), ties broken by the smallest dicom_id.

    Returns (selected records sorted by (subject_id, study_id, dicom_id), number filtered out).
    """
    wanted = {v.upper(): i for i, v in enumerate(views)}
    candidates = sorted((r for r in records if r.view in wanted), key=lambda r: r.sort_key)
    if per_study is ImagesPerStudy.ALL:
        return candidates, len(records) - len(candidates)
    best: dict[int, ImageRecord] = {}
    for record in candidates:
        current = best.get(record.study_id)
        if current is None or (wanted[record.view], record.dicom_id) < (
            wanted[current.view],
            current.dicom_id,
        ):  # type: ignore[index]
            best[record.study_id] = record
    selected = sorted(best.values(), key=lambda r: r.sort_key)
    return selected, len(records) - len(selected)


def split_rank(split: str) -> tuple[int, str]:
    """Sort order of splits: train, validate, test, then any other name alphabetically."""
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


_SAFE_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def check_split_name(split: str) -> str:
    if not _SAFE_SPLIT_RE.match(split):
        raise MetadataError(f"split name {split!r} is not usable in a shard file name")
    return split


@dataclass(frozen=True)
class ReportResult:
    sections: ReportSections | None
    issue: tuple[SkipReason, str] | None
    non_utf8: bool


def read_report(path: str) -> ReportResult:
    """Read and parse one report file (pool-friendly).

    Non-UTF-8 bytes are decoded with ``errors="replace"`` (U+FFFD) and the report is kept; the
    caller lists it as a warning. Missing or empty files are issues.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return ReportResult(None, (SkipReason.MISSING_REPORT, "report file does not exist"), False)
    except OSError as err:
        return ReportResult(None, (SkipReason.MISSING_REPORT, f"cannot read report ({err})"), False)
    try:
        text = raw.decode("utf-8")
        non_utf8 = False
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        non_utf8 = True
    sections = parse_report(text)
    if sections.is_empty:
        return ReportResult(
            sections, (SkipReason.EMPTY_REPORT, "report has neither FINDINGS nor IMPRESSION"), non_utf8
        )
    return ReportResult(sections, None, non_utf8)


@dataclass(frozen=True)
class RegionInfo:
    """Synthetic region annotations of one image (tools/make_synthetic.py)."""

    mask_path: str
    regions: dict[str, int]  # finding -> bit
    sentence_findings: dict[str, list[str]]  # normalised sentence -> findings


def load_regions(root: Path) -> dict[str, RegionInfo]:
    """Read ``<root>/mlip-synthetic-regions.csv.gz`` if present (dicom_id, finding, bit, sentence)."""
    from mlip_dist.data.reports import normalise_sentence

    path = root / REGIONS_CSV
    if not path.is_file():
        alt = root / REGIONS_CSV.removesuffix(".gz")
        if not alt.is_file():
            return {}
        path = alt
    table = read_csv(path, string_columns=("dicom_id", "finding", "sentence"))
    cols = _columns(table, path, ["dicom_id", "finding", "bit", "sentence"])
    out: dict[str, RegionInfo] = {}
    for dicom_id, finding, bit, sentence in zip(
        cols["dicom_id"], cols["finding"], cols["bit"], cols["sentence"], strict=True
    ):
        info = out.get(dicom_id)
        if info is None:
            info = RegionInfo(f"{REGIONS_DIR}/{dicom_id}.png", {}, {})
            out[dicom_id] = info
        if finding:
            info.regions[finding] = int(bit)
            if sentence:
                found = info.sentence_findings.setdefault(normalise_sentence(sentence), [])
                if finding not in found:
                    found.append(finding)
    return out
