"""DICOM to a display-ready grayscale array (pydicom, pylibjpeg plugins for compressed syntaxes).

Pipeline (what :func:`read_dicom` guarantees, in this order):
1. The modality LUT / rescale slope-intercept (``pydicom.pixels.apply_modality_lut``).
2. The VOI LUT or window centre/width of the header, first one (``apply_voi_lut``); none -> identity.
3. MONOCHROME1 is inverted so that higher values are always brighter (air dark, bone bright).
4. Linear min..max mapping to ``[0, 1]`` float32 (as MIMIC-CXR-JPG did after windowing);
   a constant image maps to all zeros.
Multi-frame data keeps the first frame; RGB data (rare secondary captures) becomes luminance.
Every failure raises :class:`ImageReadError` with the file, a machine-readable
:class:`SkipReason` and a human hint, so the packer can list it in ``errors.jsonl``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class SkipReason(str, enum.Enum):
    """Why an input was not packed (the ``reason`` field of ``errors.jsonl``)."""

    EMPTY_FILE = "empty_file"
    MISSING_FILE = "missing_file"
    CORRUPT_DICOM = "corrupt_dicom"
    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    CORRUPT_IMAGE = "corrupt_image"
    MISSING_REPORT = "missing_report"
    EMPTY_REPORT = "no_findings_or_impression"
    NON_UTF8_REPORT = "non_utf8_report"  # a warning: decoded with errors="replace" and packed
    MISSING_CSV_ROW = "missing_csv_row"
    DUPLICATE_KEY = "duplicate_key"
    MISSING_VIEW = "missing_view"
    BAD_REGIONS = "bad_regions"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSAFE_PATH = "unsafe_path"  # a CSV path/id that could escape the data root or the shard layout


# Larger than any real radiograph (MIMIC-CXR's largest are ~4300 x 3500 = 15 MP): a header asking for
# more is rejected before decoding, so a corrupt or hostile file cannot make the packer allocate GBs.
MAX_IMAGE_PIXELS = 100_000_000


class ImageReadError(Exception):
    """An image that cannot be turned into pixels; carries the file and the reason."""

    def __init__(self, path: str | Path, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{path}: {reason.value}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DicomImage:
    pixels: np.ndarray  # (H, W) float32 in [0, 1], brighter = denser
    photometric: str
    bits_stored: int
    view_position: str | None


def _check_nonempty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, SkipReason.MISSING_FILE, "file does not exist") from None
    if size == 0:
        raise ImageReadError(path, SkipReason.EMPTY_FILE, "zero-byte file")


def read_view_position(path: str | Path) -> str | None:
    """ViewPosition (0018,5101) from the header only (``stop_before_pixels``), upper-case or None."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    _check_nonempty(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"])
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise ImageReadError(path, SkipReason.CORRUPT_DICOM, f"unreadable header ({err})") from err
    view = str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    return view or None


def _to_unit_range(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32, copy=False)
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    # In place: these arrays are large (a 2500x2000 float32 is 20 MB).
    values = values - low
    values *= np.float32(1.0 / (high - low))
    return values


def _check_declared_size(ds, path: str | Path) -> None:
    """Reject, from the header alone, images with no rows/columns or more than MAX_IMAGE_PIXELS.

    ``pixel_array`` decodes every frame at once, so frames and samples count towards the limit.
    """
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError) as err:
        raise ImageReadError(path, SkipReason.CORRUPT_DICOM, f"invalid Rows/Columns/NumberOfFrames ({err})") from err
    if rows <= 0 or columns <= 0:
        raise ImageReadError(path, SkipReason.CORRUPT_DICOM, f"header declares a {rows}x{columns} image")
    total = rows * columns * max(frames, 1) * max(samples, 1)
    if total > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            path,
            SkipReason.IMAGE_TOO_LARGE,
            f"header declares {frames} frame(s) of {rows}x{columns}x{samples} = {total} values, more than "
            f"MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS}); not decoded",
        )


def decode_dataset_pixels(ds, path: str | Path) -> np.ndarray:
    """Raw stored pixel values of the first frame, or ImageReadError naming why not."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, SkipReason.NO_PIXEL_DATA, "dataset has no (7FE0,0010) Pixel Data element")
    _check_declared_size(ds, path)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        frames = ds.pixel_array
    except NotImplementedError as err:
        raise ImageReadError(
            path,
            SkipReason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"transfer syntax {syntax} ({getattr(syntax, 'name', '?')}) cannot be decoded: {err}. "
            "Install the pylibjpeg plugins (pip install -c constraints.txt '.[dicom]').",
        ) from err
    except RuntimeError as err:
        # pydicom raises RuntimeError when no installed plugin handles the syntax.
        reason = (
            SkipReason.UNSUPPORTED_TRANSFER_SYNTAX
            if "plugin" in str(err).lower()
            else SkipReason.CORRUPT_DICOM
        )
        raise ImageReadError(path, reason, f"transfer syntax {syntax}: {err}") from err
    except (ValueError, AttributeError, KeyError, EOFError, OSError, TypeError) as err:
        raise ImageReadError(path, SkipReason.CORRUPT_DICOM, f"pixel data cannot be decoded ({err})") from err
    frames = np.asarray(frames)
    frames_count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    first = frames[0] if frames_count > 1 else frames
    if samples == 3 and first.ndim == 3:
        first = first[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if first.ndim != 2 or first.size == 0:
        raise ImageReadError(path, SkipReason.CORRUPT_DICOM, f"unexpected pixel array shape {frames.shape}")
    return first


def read_dicom(path: str | Path) -> DicomImage:
    """Read a DICOM file into a [0, 1] grayscale image (pipeline in the module docstring)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    _check_nonempty(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise ImageReadError(path, SkipReason.CORRUPT_DICOM, f"not a readable DICOM file ({err})") from err
    stored = decode_dataset_pixels(ds, path)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        values = (
            apply_modality_lut(stored, ds) if int(getattr(ds, "SamplesPerPixel", 1) or 1) == 1 else stored
        )
        has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
        if has_voi:
            values = apply_voi_lut(values, ds, index=0)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as err:
        raise ImageReadError(
            path, SkipReason.CORRUPT_DICOM, f"invalid modality/VOI LUT attributes ({err})"
        ) from err
    unit = _to_unit_range(np.asarray(values))
    if photometric == "MONOCHROME1":
        # MONOCHROME1: minimum value is white; invert so every output has bright = dense.
        unit = np.float32(1.0) - unit
    view = str(getattr(ds, "ViewPosition", "") or "").strip().upper() or None
    return DicomImage(
        pixels=unit,
        photometric=photometric,
        bits_stored=int(getattr(ds, "BitsStored", 8) or 8),
        view_position=view,
    )
