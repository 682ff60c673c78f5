"""DICOM decoding (mlip_dist.data.dicom) and resizing/encoding (mlip_dist.data.imaging)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from mlip_dist.data.dicom import ImageReadError, SkipReason, read_dicom, read_view_position
from mlip_dist.data.imaging import (
    ImageFormat,
    encode,
    quantize,
    read_raster,
    resize_mask,
    resize_shorter_side,
    target_size,
)

sys.path.insert(0, str(Path(__file__).parent))
from mimic_fixtures import write_dicom  # noqa: E402

REAL_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_cxr"


def _minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


def test_real_siim_jpeg_baseline():
    paths = sorted(REAL_CXR.glob("siim_*.dcm"))
    if not paths:
        pytest.skip(f"no real SIIM DICOM under {REAL_CXR}")
    image = read_dicom(paths[0])
    assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert image.photometric == "MONOCHROME2" and image.view_position == "PA"
    # Reference: pydicom's own decode, min-max scaled (no modality/VOI attributes in this file).
    ds = pydicom.dcmread(paths[0])
    np.testing.assert_allclose(image.pixels, _minmax(ds.pixel_array), atol=1e-6)
    # A chest X-ray is not a flat image: the lung field is darker than the mediastinum.
    assert 0.2 < float(image.pixels.mean()) < 0.8


@pytest.mark.parametrize(
    "compressed", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_compressed_syntaxes_match_uncompressed(compressed):
    reference = read_dicom(get_testdata_file("MR_small.dcm")).pixels
    np.testing.assert_array_equal(read_dicom(get_testdata_file(compressed)).pixels, reference)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm"])
def test_lossy_compressed_syntaxes_decode(name):
    image = read_dicom(get_testdata_file(name))
    ds = pydicom.dcmread(get_testdata_file(name))
    assert image.pixels.shape == (ds.Rows, ds.Columns)
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0


def test_modality_lut_ct_small():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1 and "WindowCenter" not in ds  # signed, no VOI: identity window
    hounsfield = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(read_dicom(path).pixels, _minmax(hounsfield), atol=1e-6)


def test_window_and_rescale_reference(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(30, 20), dtype=np.uint16)
    path = tmp_path / "w.dcm"
    write_dicom(path, stored, window=(1500.0, 1000.0), rescale=(0.5, 100.0))
    real = stored * 0.5 + 100.0
    windowed = np.clip((real - (1500.0 - 0.5)) / (1000.0 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(read_dicom(path).pixels, _minmax(windowed), atol=1e-5)


def test_monochrome1_is_inverted(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 4096, size=(16, 24), dtype=np.uint16)
    write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1")
    write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2")
    mono1, mono2 = read_dicom(tmp_path / "m1.dcm"), read_dicom(tmp_path / "m2.dcm")
    assert mono1.photometric == "MONOCHROME1"
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    np.testing.assert_allclose(mono2.pixels, _minmax(stored), atol=1e-6)


def test_16_bit_stored(tmp_path):
    stored = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    write_dicom(tmp_path / "b16.dcm", stored, bits_stored=16)
    image = read_dicom(tmp_path / "b16.dcm")
    assert image.bits_stored == 16
    np.testing.assert_allclose(image.pixels, _minmax(stored), atol=1e-6)


def test_view_position_header_only(tmp_path):
    write_dicom(tmp_path / "v.dcm", np.zeros((4, 4), np.uint8), view="AP")
    write_dicom(tmp_path / "n.dcm", np.zeros((4, 4), np.uint8), view=None)
    assert read_view_position(tmp_path / "v.dcm") == "AP"
    assert read_view_position(tmp_path / "n.dcm") is None


def test_failures_name_file_and_reason(tmp_path):
    good = tmp_path / "good.dcm"
    write_dicom(good, np.full((32, 32), 7, np.uint16))
    cases = {
        "empty.dcm": (b"", SkipReason.EMPTY_FILE),
        "garbage.dcm": (b"this is not a dicom file" * 10, SkipReason.CORRUPT_DICOM),
        "truncated.dcm": (good.read_bytes()[:-900], SkipReason.CORRUPT_DICOM),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError) as info:
            read_dicom(tmp_path / name)
        assert info.value.reason is reason, name
        assert name in str(info.value)
    write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4), np.uint8), with_pixels=False)
    with pytest.raises(ImageReadError) as info:
        read_dicom(tmp_path / "nopix.dcm")
    assert info.value.reason is SkipReason.NO_PIXEL_DATA
    with pytest.raises(ImageReadError) as info:
        read_dicom(tmp_path / "absent.dcm")
    assert info.value.reason is SkipReason.MISSING_FILE
    # A flat image is valid and maps to zeros rather than dividing by zero.
    assert read_dicom(good).pixels.max() == 0.0


def test_unsupported_transfer_syntax(tmp_path):
    from pydicom.uid import UID

    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder exists
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError) as info:
        read_dicom(path)
    assert info.value.reason is SkipReason.UNSUPPORTED_TRANSFER_SYNTAX


def test_resize_keeps_aspect_and_area_average():
    assert target_size(2500, 2000, 512) == (640, 512)
    assert target_size(2000, 2500, 512) == (512, 640)
    image = np.random.default_rng(0).random((64, 96)).astype(np.float32)
    out = resize_shorter_side(image, 16)
    assert out.shape == (16, 24)
    # Integer factor 4: area resampling equals the mean of each 4x4 block.
    blocks = image.reshape(16, 4, 24, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(out, blocks, atol=1e-5)


def test_encode_png_8_16_and_jpeg_roundtrip():
    image = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    for depth, mode, scale in ((8, "L", 255), (16, "I;16", 65535)):
        data = encode(quantize(image, depth), ImageFormat.PNG)
        assert data == encode(quantize(image, depth), ImageFormat.PNG)  # deterministic bytes
        decoded = Image.open(io.BytesIO(data))
        assert decoded.mode == mode
        np.testing.assert_array_equal(np.asarray(decoded), np.rint(image * scale))
    jpeg = Image.open(io.BytesIO(encode(quantize(image, 8), ImageFormat.JPG)))
    assert jpeg.format == "JPEG" and jpeg.mode == "L" and jpeg.size == (30, 20)
    with pytest.raises(ValueError):
        encode(quantize(image, 16), ImageFormat.JPG)


def test_mask_nearest_keeps_bit_values():
    mask = np.zeros((40, 60), np.uint16)
    mask[:20, :30] = 0b101
    mask[20:, 30:] = 1 << 15
    small = resize_mask(mask, 10, 15)
    assert set(np.unique(small)) == {0, 0b101, 1 << 15}
    assert small[0, 0] == 0b101 and small[-1, -1] == 1 << 15


def test_read_raster_gray_and_corrupt(tmp_path):
    pixels = (np.arange(200).reshape(10, 20) % 256).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_raster(tmp_path / "a.png"), pixels / 255.0, atol=1e-6)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(ImageReadError) as info:
        read_raster(tmp_path / "bad.jpg")
    assert info.value.reason is SkipReason.CORRUPT_IMAGE
