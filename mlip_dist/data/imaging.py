"""Resize and encode grayscale images for the shards (METHOD.md, Data: "Image: stored once,
resized so the shorter side is ``store_size``").

Guarantees: outputs are single-channel; resizing keeps the aspect ratio (longer side rounded
to the nearest pixel) and uses area averaging (PIL ``BOX``, the exact area filter when
shrinking) or Lanczos; PNG and JPEG encodings are deterministic (fixed settings, no
timestamps or text chunks), so the same pixels always give the same bytes.
"""

from __future__ import annotations

import enum
import io
from pathlib import Path

import numpy as np
from PIL import Image

from mlip_dist.data.dicom import ImageReadError, SkipReason


class ImageFormat(str, enum.Enum):
    PNG = "png"
    JPG = "jpg"


class Resample(str, enum.Enum):
    AREA = "area"
    LANCZOS = "lanczos"

    @property
    def pil(self) -> Image.Resampling:
        return Image.Resampling.BOX if self is Resample.AREA else Image.Resampling.LANCZOS


PNG_COMPRESS_LEVEL = 6
JPEG_QUALITY = 95


def target_size(height: int, width: int, shorter_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side = ``shorter_side`` and the aspect ratio kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = shorter_side / min(height, width)
    if height <= width:
        return shorter_side, max(1, round(width * scale))
    return max(1, round(height * scale)), shorter_side


def resize_shorter_side(
    image: np.ndarray, shorter_side: int, resample: Resample = Resample.AREA
) -> np.ndarray:
    """Resize a float32 (H, W) image in [0, 1]; returns float32 (h, w) clipped to [0, 1]."""
    height, width = image.shape
    new_h, new_w = target_size(height, width, shorter_side)
    if (new_h, new_w) == (height, width):
        return image.astype(np.float32, copy=False)
    # Mode "F" keeps full precision through the filter (16-bit output needs it).
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize(
        (new_w, new_h), resample=resample.pil
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def quantize(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """[0, 1] float -> uint8 (bit_depth 8) or uint16 (bit_depth 16), round half to even."""
    if bit_depth == 8:
        return np.rint(image * 255.0).astype(np.uint8)
    if bit_depth == 16:
        return np.rint(image * 65535.0).astype(np.uint16)
    raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")


def encode(image: np.ndarray, fmt: ImageFormat) -> bytes:
    """Encode a uint8 or uint16 (H, W) array as grayscale PNG (8/16 bit) or JPEG (8 bit only)."""
    buffer = io.BytesIO()
    if fmt is ImageFormat.PNG:
        if image.dtype not in (np.uint8, np.uint16) or image.ndim != 2:
            raise ValueError(f"PNG needs a 2-D uint8 or uint16 array, got {image.dtype} {image.shape}")
        # uint8 -> mode "L", uint16 -> mode "I;16" (a 16-bit grayscale PNG).
        pil = Image.fromarray(image)
        pil.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        if image.dtype != np.uint8:
            raise ValueError("JPEG output is 8-bit only; use --bit-depth 8 or --image-format png")
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buffer.getvalue()


def read_raster(path: str | Path) -> np.ndarray:
    """Read a JPG/PNG (the MIMIC-CXR-JPG release) as float32 (H, W) in [0, 1], as stored."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, SkipReason.MISSING_FILE, "file does not exist") from None
    if size == 0:
        raise ImageReadError(path, SkipReason.EMPTY_FILE, "zero-byte file")
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(pil, dtype=np.float32) / 65535.0
            else:
                array = np.asarray(pil.convert("L"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(path, SkipReason.CORRUPT_IMAGE, f"cannot decode image ({err})") from err
    return np.clip(array, 0.0, 1.0).astype(np.float32, copy=False)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint16 bit-flag mask (bits must never be blended)."""
    if mask.shape == (height, width):
        return mask
    resized = Image.fromarray(mask.astype(np.uint16)).resize(
        (width, height), resample=Image.Resampling.NEAREST
    )
    return np.asarray(resized, dtype=np.uint16)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a 16-bit PNG bit-flag mask as uint16 (H, W)."""
    with Image.open(path) as pil:
        pil.load()
        return np.asarray(pil).astype(np.uint16)
