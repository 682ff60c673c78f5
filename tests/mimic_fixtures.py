"""Tiny MIMIC-CXR / MIMIC-CXR-JPG trees in the PhysioNet layout, built on the fly for tests.

Not a conftest: test files import what they need explicitly.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlip_dist.data.mimic import CHEXPERT_LABELS

CHEXPERT = CHEXPERT_LABELS

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear without focal consolidation.  The heart size is normal.
 There is a small left pleural effusion which is
 slightly increased compared to ___.

 IMPRESSION:

 Small left pleural effusion.
"""

REPORT_COMBINED = """ FINAL REPORT
 HISTORY: Shortness of breath.

 findings and  impression :  1. Moderate pulmonary edema. 2. No pneumothorax is seen.
"""

REPORT_NO_HEADINGS = """ FINAL REPORT
 INDICATION: Evaluate for pneumonia.

 PA and lateral views of the chest were obtained.

 No acute cardiopulmonary process.  Stable cardiomegaly.
"""

REPORT_ONLY_OTHER = """ FINAL REPORT
 INDICATION: Line placement.
 COMPARISON: None.
"""


@dataclass
class StudySpec:
    subject_id: int
    study_id: int
    split: str
    report: str | bytes | None  # None -> no report file
    images: list[tuple[str, str, str]] = field(default_factory=list)  # (dicom_id, view, kind)
    labels: dict[str, float | None] = field(default_factory=dict)


def default_studies() -> list[StudySpec]:
    """Eight studies covering selection, every report variant and corrupt inputs.

    Image kinds: "ok12" (12-bit MONOCHROME2 with window), "mono1" (MONOCHROME1, rescale),
    "ok8", "truncated", "empty", "nopixels".
    """
    return [
        StudySpec(
            10000001,
            50000001,
            "train",
            REPORT_FULL,
            [("b-lat", "LATERAL", "ok8"), ("c-pa", "PA", "ok12"), ("a-ap", "AP", "ok8")],
            {"Pleural Effusion": 1.0, "No Finding": None, "Edema": -1.0},
        ),
        StudySpec(10000002, 50000002, "train", REPORT_COMBINED, [("d-ap", "AP", "mono1")], {"Edema": 1.0}),
        StudySpec(
            10000003, 50000003, "train", REPORT_NO_HEADINGS, [("e-pa", "PA", "ok12")], {"Cardiomegaly": 1.0}
        ),
        StudySpec(10000004, 50000004, "train", REPORT_ONLY_OTHER, [("f-pa", "PA", "ok8")]),
        StudySpec(10000005, 50000005, "train", REPORT_FULL, [("g-pa", "PA", "truncated")]),
        StudySpec(10000006, 50000006, "train", None, [("h-pa", "PA", "ok8")]),
        StudySpec(
            11000007,
            50000007,
            "validate",
            REPORT_FULL.encode("utf-8").replace(b"clear", b"cl\xe9ar"),
            [("i-pa", "PA", "ok12")],
        ),
        StudySpec(
            12000008, 50000008, "test", REPORT_COMBINED, [("j-ap", "AP", "ok8"), ("k-pa", "PA", "empty")]
        ),
    ]


def _image(kind: str, seed: int, shape: tuple[int, int] = (40, 52)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    structure = np.sin(xx / 5.0) + np.cos(yy / 7.0)
    if kind == "ok8":
        return np.clip(100 + 50 * structure + rng.normal(0, 5, shape), 0, 255).astype(np.uint8)
    return np.clip(2000 + 800 * structure + rng.normal(0, 50, shape), 0, 4095).astype(np.uint16)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    view: str | None = "PA",
    bits_stored: int | None = None,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    with_pixels: bool = True,
) -> None:
    """A minimal valid DICOM file (explicit VR little endian) written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    uid = generate_uid(entropy_srcs=[str(path.name)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.Modality = "DX"
    if view is not None:
        ds.ViewPosition = view
    if with_pixels:
        bits = bits_stored or (8 if pixels.dtype == np.uint8 else 12)
        ds.set_pixel_data(pixels, photometric, bits)
    else:
        ds.Rows, ds.Columns = pixels.shape
        ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_csv_gz(path: Path, header: list[str], rows: list[list[object]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps fixture files byte-stable.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(text.getvalue().encode())


def _rel(subject: int, study: int) -> str:
    return f"files/p{str(subject)[:2]}/p{subject}/s{study}"


def _write_reports(root: Path, studies: list[StudySpec]) -> None:
    for spec in studies:
        if spec.report is None:
            continue
        path = root / f"{_rel(spec.subject_id, spec.study_id)}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = spec.report if isinstance(spec.report, bytes) else spec.report.encode("utf-8")
        path.write_bytes(data)


def _write_shared_csvs(csv_dir: Path, studies: list[StudySpec], csv_gz: bool = True) -> None:
    rows_meta, rows_split, rows_labels = [], [], []
    for spec in studies:
        for dicom_id, view, _ in spec.images:
            rows_meta.append([dicom_id, spec.subject_id, spec.study_id, "CHEST", view, 40, 52])
            rows_split.append([dicom_id, spec.study_id, spec.subject_id, spec.split])
        rows_labels.append([spec.subject_id, spec.study_id, *[spec.labels.get(n) for n in CHEXPERT]])
    _write_csv_gz(
        csv_dir / "mimic-cxr-2.0.0-metadata.csv.gz",
        [
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
        ],
        rows_meta,
    )
    _write_csv_gz(
        csv_dir / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], rows_split
    )
    _write_csv_gz(
        csv_dir / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT], rows_labels
    )
    if not csv_gz:
        for path in csv_dir.glob("*.csv.gz"):
            path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
            path.unlink()


def make_dicom_release(
    root: Path,
    studies: list[StudySpec] | None = None,
    csv_dir: Path | None = None,
    with_metadata: bool = True,
) -> list[StudySpec]:
    """MIMIC-CXR 2.0.0 layout: DICOMs, reports, cxr-record-list and cxr-study-list (gzipped).

    The JPG-release CSVs (metadata, split, chexpert) go to ``csv_dir`` (default ``root``) unless
    ``with_metadata`` is False (then views come from DICOM headers and every image is "train").
    """
    studies = studies if studies is not None else default_studies()
    records, study_rows = [], []
    seed = 0
    for spec in studies:
        study_rows.append([spec.subject_id, spec.study_id, f"{_rel(spec.subject_id, spec.study_id)}.txt"])
        for dicom_id, view, kind in spec.images:
            rel = f"{_rel(spec.subject_id, spec.study_id)}/{dicom_id}.dcm"
            path = root / rel
            records.append([spec.subject_id, spec.study_id, dicom_id, rel])
            seed += 1
            if kind == "empty":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
            elif kind == "mono1":
                write_dicom(path, _image(kind, seed), "MONOCHROME1", view, rescale=(2.0, -100.0))
            elif kind == "ok12":
                write_dicom(path, _image(kind, seed), "MONOCHROME2", view, window=(2000.0, 2400.0))
            elif kind == "nopixels":
                write_dicom(path, _image(kind, seed), view=view, with_pixels=False)
            elif kind == "truncated":
                write_dicom(path, _image("ok12", seed), view=view)
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
            else:
                write_dicom(path, _image(kind, seed), "MONOCHROME2", view)
    _write_csv_gz(root / "cxr-record-list.csv.gz", ["subject_id", "study_id", "dicom_id", "path"], records)
    _write_csv_gz(root / "cxr-study-list.csv.gz", ["subject_id", "study_id", "path"], study_rows)
    _write_reports(root, studies)
    if with_metadata:
        _write_shared_csvs(csv_dir or root, studies)
    return studies


def make_jpg_release(
    root: Path, reports_root: Path, studies: list[StudySpec] | None = None, csv_gz: bool = False
) -> list[StudySpec]:
    """MIMIC-CXR-JPG 2.x layout (JPGs + metadata/split/chexpert CSVs); reports in ``reports_root``."""
    from PIL import Image

    studies = studies if studies is not None else default_studies()
    seed = 0
    for spec in studies:
        for dicom_id, _view, kind in spec.images:
            path = root / f"{_rel(spec.subject_id, spec.study_id)}/{dicom_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            seed += 1
            if kind == "empty":
                path.write_bytes(b"")
                continue
            pixels = _image("ok8", seed)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
            path.write_bytes(data[: len(data) // 3] if kind == "truncated" else data)
    _write_shared_csvs(root, studies, csv_gz=csv_gz)
    _write_reports(reports_root, studies)
    return studies


def many_studies(n: int, seed: int = 0) -> list[StudySpec]:
    """``n`` valid single-image studies (PA, 8-bit) across the three splits, for sharding tests."""
    rng = np.random.default_rng(seed)
    splits = ("train", "train", "train", "validate", "test")
    return [
        StudySpec(
            10000100 + i,
            51000000 + i,
            splits[i % len(splits)],
            REPORT_FULL,
            [(f"img{i:04d}", "PA", "ok8" if rng.random() < 0.5 else "ok12")],
        )
        for i in range(n)
    ]
