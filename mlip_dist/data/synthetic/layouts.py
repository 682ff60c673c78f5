"""File writers for the public dataset layouts the synthetic generator imitates.

MIMIC-CXR 2.0.0 (DICOM) / MIMIC-CXR-JPG 2.x, CheXpert-v1.0-small, RSNA Pneumonia (stage 2)
and SIIM-ACR Pneumothorax. Every writer is atomic (temp file + rename) and deterministic
(gzip headers carry no time stamp or file name; DICOM UIDs are derived from the seed).
Formats are documented in docs/SYNTHETIC.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mlip_dist.data.synthetic.findings import CHEXPERT_LABELS

# Digital X-Ray Image Storage - For Presentation.
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

MIMIC_METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
MIMIC_SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
MIMIC_LABEL_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
MIMIC_RECORD_COLUMNS = ("subject_id", "study_id", "dicom_id", "path")
MIMIC_STUDY_COLUMNS = ("subject_id", "study_id", "path")
REGION_COLUMNS = ("dicom_id", "finding", "bit", "sentence")
# CheXpert orders its label columns differently from MIMIC-CXR.
CHEXPERT_ORDER = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_ORDER)
RSNA_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
RSNA_CLASS_COLUMNS = ("patientId", "class")
# The real SIIM file has a space after the comma in its header and before every value.
SIIM_HEADER = "ImageId, EncodedPixels"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_label(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if value is None else value for value in row])
    return buffer.getvalue().encode("utf-8")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    atomic_write_bytes(path, csv_bytes(header, rows))


def write_csv_gz(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Gzipped CSV with a fixed gzip header (mtime 0, no name) so output is byte-identical."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=6) as handle:
        handle.write(csv_bytes(header, rows))
    atomic_write_bytes(path, buffer.getvalue())


def png_bytes(array: np.ndarray) -> bytes:
    """8-bit (uint8) or 16-bit (uint16) grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def jpg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    if array.dtype != np.uint8:
        raise ValueError(f"JPEG needs uint8 pixels, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def to_uint8(pixels: np.ndarray, max_value: int) -> np.ndarray:
    """MONOCHROME2 pixels in [0, max_value] -> display 8-bit (bright = dense)."""
    return np.clip(np.round(pixels.astype(np.float32) * (255.0 / max_value)), 0, 255).astype(np.uint8)


def deterministic_uid(*parts: object) -> str:
    """A DICOM UID derived (hashed) from `parts`: same inputs, same UID."""
    return generate_uid(entropy_srcs=[str(part) for part in parts])


@dataclass(frozen=True)
class DicomFields:
    """Identifying and acquisition attributes of one synthetic DICOM."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    view_position: str
    study_date: str = "21500101"
    study_time: str = "120000.000"
    modality: str = "DX"
    sex: str = "O"
    age: str = ""
    study_id: str = ""
    description: str = "CHEST"
    patient_orientation: tuple[str, str] = ("L", "F")
    pixel_spacing_mm: float = 0.139


def dicom_bytes(pixels: np.ndarray, fields: DicomFields, *, bits_stored: int, photometric: str) -> bytes:
    """An uncompressed (Explicit VR Little Endian) grayscale DICOM with full file meta.

    `pixels` are the stored values (uint16 for bits_stored > 8, else uint8); for MONOCHROME1
    the caller has already inverted them. Rescale is identity; the window spans the range.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported PhotometricInterpretation {photometric!r}")
    allocated = 16 if bits_stored > 8 else 8
    expected = np.uint16 if allocated == 16 else np.uint8
    if pixels.dtype != expected or pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D {np.dtype(expected).name} for BitsStored {bits_stored}, got {pixels.dtype} {pixels.shape}")
    sop_class = DX_FOR_PRESENTATION if fields.modality == "DX" else CR_IMAGE_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = fields.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = fields.sop_uid
    ds.StudyInstanceUID = fields.study_uid
    ds.SeriesInstanceUID = fields.series_uid
    ds.Modality = fields.modality
    ds.PatientID = fields.patient_id
    ds.PatientName = "Anonymous"
    ds.PatientSex = fields.sex
    if fields.age:
        ds.PatientAge = fields.age
    ds.StudyDate = fields.study_date
    ds.StudyTime = fields.study_time
    ds.StudyID = fields.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = fields.description
    ds.ViewPosition = fields.view_position
    ds.PatientOrientation = list(fields.patient_orientation)
    ds.ImagerPixelSpacing = [fields.pixel_spacing_mm, fields.pixel_spacing_mm]
    ds.PixelSpacing = [fields.pixel_spacing_mm, fields.pixel_spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    top = (1 << bits_stored) - 1
    ds.WindowCenter = top // 2 + 1
    ds.WindowWidth = top + 1
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# SIIM-ACR relative run-length encoding
# ----------------------------------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> str:
    """SIIM-ACR relative RLE of a boolean (H, W) mask; "-1" for an empty mask.

    Pixels are numbered column-major (down each column, then the next column), as the
    competition's ``mask2rle(img.T, ...)`` does. Pairs are (offset from the end of the previous
    run, run length); the first offset is absolute.
    """
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    if not flat.any():
        return "-1"
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    previous_end = np.concatenate([[0], ends[:-1]])
    pairs = np.stack([starts - previous_end, ends - starts], axis=1).ravel()
    return " ".join(str(int(value)) for value in pairs)


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`rle_encode` (the competition's ``rle2mask`` followed by ``.T``)."""
    mask = np.zeros(height * width, dtype=bool)
    text = rle.strip()
    if text == "-1" or not text:
        return mask.reshape(width, height).T
    values = [int(token) for token in text.split()]
    if len(values) % 2:
        raise ValueError(f"SIIM RLE has an odd number of values ({len(values)})")
    position = 0
    for offset, length in zip(values[0::2], values[1::2], strict=True):
        position += offset
        if position + length > mask.size:
            raise ValueError(f"SIIM RLE run ends at {position + length}, beyond a {height}x{width} image")
        mask[position : position + length] = True
        position += length
    return mask.reshape(width, height).T


def mimic_study_dir(subject_id: int, study_id: int) -> str:
    """``files/pNN/pNNNNNNNN/sNNNNNNNN`` (relative to the dataset root)."""
    subject = f"{subject_id:08d}"
    return f"files/p{subject[:2]}/p{subject}/s{study_id:08d}"
