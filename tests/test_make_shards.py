"""End-to-end tests of tools/make_shards.py on tiny MIMIC-layout trees built here."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlip_dist.data.imaging import ImageFormat
from mlip_dist.data.mimic import ImagesPerStudy
from mlip_dist.data.shard_writer import STATE_DIR, PackOptions, pack, tar_file_bytes, tar_member_bytes
from mlip_dist.data.verify import verify_shards

sys.path.insert(0, str(Path(__file__).parent))
import mimic_fixtures as mf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_shards.py"


def _options(root: Path, out: Path, **kw) -> PackOptions:
    kw.setdefault("size", 16)
    kw.setdefault("progress", False)
    return PackOptions(root=root, out=out, **kw)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def _tar_sample_count(path: Path) -> int:
    """Samples of a shard counted with plain tarfile: distinct keys (basename up to the first dot)."""
    with tarfile.open(path) as archive:
        return len({member.name.partition(".")[0] for member in archive if member.isreg()})


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mimic_dcm")
    mf.make_dicom_release(root)
    return root


@pytest.fixture(scope="module")
def packed(dicom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "shards"
    summary = pack(_options(dicom_root, out, shard_size=2))
    return out, summary


def test_selection_counts_and_errors(packed):
    out, summary = packed
    # 8 studies: 4 packed; report-less, heading-less-only, truncated and zero-byte inputs skipped.
    assert summary.packed == 4
    assert dict(summary.skipped) == {
        "corrupt_dicom": 1,
        "empty_file": 1,
        "missing_report": 1,
        "no_findings_or_impression": 1,
    }
    assert dict(summary.warnings) == {"non_utf8_report": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_reason = {e["reason"]: e for e in errors}
    assert by_reason["corrupt_dicom"]["file"] == "files/p10/p10000005/s50000005/g-pa.dcm"
    assert by_reason["empty_file"]["file"] == "files/p12/p12000008/s50000008/k-pa.dcm"
    assert by_reason["missing_report"]["file"] == "files/p10/p10000006/s50000006.txt"
    assert by_reason["non_utf8_report"]["severity"] == "warning"
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["splits"]["train"] == {
        "shards": ["train-000000.tar", "train-000001.tar"],
        "num_samples": 3,
        "shard_bytes": [(out / f"train-00000{i}.tar").stat().st_size for i in range(2)],
        "shard_samples": [_tar_sample_count(out / f"train-00000{i}.tar") for i in range(2)],
    }
    assert sum(dataset["splits"]["train"]["shard_samples"]) == 3
    assert dataset["splits"]["validate"]["num_samples"] == 1
    # The test split's only selected image is the zero-byte PA: listed, with no shards.
    assert dataset["splits"]["test"] == {"shards": [], "num_samples": 0, "shard_bytes": [], "shard_samples": []}
    assert dataset["options"]["size"] == 16


def test_sample_contents(packed, dicom_root):
    out, _ = packed
    samples = _read_tar(out / "train-000000.tar")
    # Study 1 has LATERAL, PA and AP: one image per study, PA preferred.
    assert list(samples) == ["10000001_50000001_c-pa", "10000002_50000002_d-ap"]
    meta = json.loads(samples["10000001_50000001_c-pa"]["json"])
    assert meta["view"] == "PA" and meta["split"] == "train"
    assert meta["impression"] == "Small left pleural effusion."
    assert meta["sentences"][-1] == "Small left pleural effusion." and len(meta["sentences"]) == 4
    assert meta["labels"]["Pleural Effusion"] == 1 and meta["labels"]["Edema"] == -1
    assert meta["labels"]["No Finding"] is None and len(meta["labels"]) == 14
    assert meta["orig_size"] == [40, 52] and meta["source"] == "files/p10/p10000001/s50000001/c-pa.dcm"
    assert samples["10000001_50000001_c-pa"]["txt"].decode() == meta["findings"] + "\n" + meta["impression"]
    image = Image.open(io.BytesIO(samples["10000001_50000001_c-pa"]["png"]))
    assert image.mode == "L" and image.size == (21, 16)  # shorter side 16, 52/40 aspect kept
    # Reference: the fixture's window applied by hand, area-resized, 8-bit.
    import pydicom

    ds = pydicom.dcmread(dicom_root / meta["source"])
    windowed = np.clip((ds.pixel_array - (2000 - 0.5)) / (2400 - 1) + 0.5, 0, 1)
    unit = (windowed - windowed.min()) / (windowed.max() - windowed.min())
    reference = Image.fromarray(unit.astype(np.float32), mode="F").resize((21, 16), Image.Resampling.BOX)
    assert np.abs(np.asarray(image, float) - np.rint(np.asarray(reference) * 255)).max() <= 1
    # MONOCHROME1 study: the stored image is inverted relative to the raw pixel values.
    mono = Image.open(io.BytesIO(samples["10000002_50000002_d-ap"]["png"]))
    raw = pydicom.dcmread(dicom_root / "files/p10/p10000002/s50000002/d-ap.dcm").pixel_array.astype(float)
    small = np.asarray(
        Image.fromarray(raw.astype(np.float32), mode="F").resize(mono.size, Image.Resampling.BOX)
    )
    assert np.corrcoef(small.ravel(), np.asarray(mono, float).ravel())[0, 1] < -0.95


def test_manifest_and_verify(packed):
    out, _ = packed
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["key"] for r in table] == [
        "10000001_50000001_c-pa",
        "10000002_50000002_d-ap",
        "10000003_50000003_e-pa",
        "11000007_50000007_i-pa",
    ]
    assert [r["shard"] for r in table] == ["train-000000.tar"] * 2 + [
        "train-000001.tar",
        "validate-000000.tar",
    ]
    assert table[0]["labels"]["Pleural Effusion"] == 1 and table[0]["n_sentences"] == 4
    import hashlib

    members = _read_tar(out / "train-000000.tar")["10000001_50000001_c-pa"]
    assert json.loads(table[0]["member_sha256"]) == {
        k: hashlib.sha256(v).hexdigest() for k, v in members.items()
    }
    report = verify_shards(out, progress=False)
    assert report.ok, report.problems
    assert (report.shards, report.samples) == (3, 4)


def test_verify_detects_tampering(packed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(packed[0], out)
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data
    shard.write_bytes(bytes(data))
    (out / "train-000009.tar").write_bytes(b"")
    problems = verify_shards(out, progress=False).problems
    assert any("sha256 mismatch" in p for p in problems)
    assert any("train-000009.tar: not listed" in p for p in problems)
    (out / "validate-000000.tar").unlink()
    assert any(
        "validate-000000.tar: listed in dataset.json but missing" in p
        for p in verify_shards(out, progress=False).problems
    )
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--verify", str(out), "--no-progress"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "PROBLEM" in proc.stderr


def test_readback_with_webdataset_and_tar(packed):
    import webdataset as wds

    out, _ = packed
    urls = [str(out / name) for name in ("train-000000.tar", "train-000001.tar")]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [
        "10000001_50000001_c-pa",
        "10000002_50000002_d-ap",
        "10000003_50000003_e-pa",
    ]
    assert samples[0]["png"].size == (21, 16) and samples[0]["json"]["dicom_id"] == "c-pa"
    listing = subprocess.run(
        ["tar", "-tvf", urls[0]], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert len(listing) == 6 and all(" mlip/mlip " in line and "1970-01-01" in line for line in listing)


def test_deterministic_and_resumable(dicom_root, packed, tmp_path):
    reference = _tree_bytes(packed[0])
    out = tmp_path / "again"
    pack(_options(dicom_root, out, shard_size=2))
    assert _tree_bytes(out) == reference
    # Simulated crash: the last shards vanished, a half-written temp shard and its sidecar-less tar remain.
    (out / "validate-000000.tar").unlink()
    (out / STATE_DIR / "train-000001.tar.json").unlink()
    (out / "train-000001.tar").write_bytes(b"partial")
    (out / "validate-000000.tar.tmp").write_bytes(b"half a shard")
    mtime_first = (out / "train-000000.tar").stat().st_mtime_ns
    summary = pack(_options(dicom_root, out, shard_size=2))
    assert summary.resumed_shards == 1
    assert (out / "train-000000.tar").stat().st_mtime_ns == mtime_first  # complete shard not rewritten
    assert _tree_bytes(out) == reference
    assert not list(out.glob("*.tmp"))
    # Different options in the same folder are refused rather than mixed.
    with pytest.raises(ValueError, match="fingerprint"):
        pack(_options(dicom_root, out, shard_size=3))


def test_worker_count_does_not_change_bytes(dicom_root, packed, tmp_path):
    out = tmp_path / "two_workers"
    pack(_options(dicom_root, out, shard_size=2, workers=2))
    assert _tree_bytes(out) == _tree_bytes(packed[0])


def test_max_shard_bytes_and_all_images(tmp_path):
    root = tmp_path / "many"
    mf.make_dicom_release(root, mf.many_studies(12))
    out = tmp_path / "out"
    limit = 10240  # one tar record: room for about two of these tiny samples
    pack(_options(root, out, shard_size=100, max_shard_bytes=limit))
    dataset = json.loads((out / "dataset.json").read_text())
    sizes = [b for info in dataset["splits"].values() for b in info["shard_bytes"]]
    assert max(sizes) <= limit and len(dataset["splits"]["train"]["shards"]) >= 3
    assert all(
        (out / n).stat().st_size == b
        for info in dataset["splits"].values()
        for n, b in zip(info["shards"], info["shard_bytes"], strict=True)
    )
    assert sum(info["num_samples"] for info in dataset["splits"].values()) == 12
    for info in dataset["splits"].values():  # the loader's per-shard counts match the tars themselves
        assert info["shard_samples"] == [_tar_sample_count(out / n) for n in info["shards"]]
        assert sum(info["shard_samples"]) == info["num_samples"]
    assert verify_shards(out, progress=False).ok
    assert tar_file_bytes(sum(tar_member_bytes(n) for n in (1, 512, 513))) == 10240
    # --images-per-study all on the default fixture keeps PA and AP of study 1 (not the lateral).
    mf_root = tmp_path / "dcm"
    mf.make_dicom_release(mf_root)
    summary = pack(_options(mf_root, tmp_path / "all2", images_per_study=ImagesPerStudy.ALL))
    keys = [r["key"] for r in pq.read_table(tmp_path / "all2" / "manifest.parquet").to_pylist()]
    assert "10000001_50000001_a-ap" in keys and "10000001_50000001_c-pa" in keys
    assert not any(k.endswith("b-lat") for k in keys)
    assert "12000008_50000008_j-ap" in keys  # the test split now has its AP image
    assert summary.packed == 6


def test_jpg_release_separate_reports_plain_csv(tmp_path):
    root, reports = tmp_path / "jpg", tmp_path / "reports"
    mf.make_jpg_release(root, reports, csv_gz=False)
    assert (root / "mimic-cxr-2.0.0-metadata.csv").is_file()
    out = tmp_path / "out"
    summary = pack(_options(root, out, reports_root=reports, image_format=ImageFormat.JPG))
    assert summary.packed == 4
    assert dict(summary.skipped) == {
        "corrupt_image": 1,
        "empty_file": 1,
        "missing_report": 1,
        "no_findings_or_impression": 1,
    }
    samples = _read_tar(out / "train-000000.tar")
    first = samples["10000001_50000001_c-pa"]
    assert Image.open(io.BytesIO(first["jpg"])).format == "JPEG"
    assert json.loads(first["json"])["source"] == "files/p10/p10000001/s50000001/c-pa.jpg"


def test_views_from_headers_without_metadata_and_16_bit(tmp_path):
    root = tmp_path / "dcm"
    mf.make_dicom_release(root, with_metadata=False)
    out = tmp_path / "out"
    summary = pack(_options(root, out, bit_depth=16, max_error_frac=1.0))
    dataset = json.loads((out / "dataset.json").read_text())
    assert list(dataset["splits"]) == ["train"]  # no split CSV: everything is train, documented
    assert dataset["inputs"]["view_source"] == "DICOM header"
    # the zero-byte PA fails its header read, so study 8 falls back to its AP image.
    keys = [r["key"] for r in pq.read_table(out / "manifest.parquet").to_pylist()]
    assert "12000008_50000008_j-ap" in keys and "10000001_50000001_c-pa" in keys
    assert summary.skipped["empty_file"] == 1
    png = _read_tar(out / "train-000000.tar")["10000001_50000001_c-pa"]["png"]
    assert Image.open(io.BytesIO(png)).mode == "I;16"


def test_csv_root_separate_from_images(tmp_path):
    root, csvs = tmp_path / "dcm", tmp_path / "jpg_csvs"
    mf.make_dicom_release(root, csv_dir=csvs)
    out = tmp_path / "out"
    pack(_options(root, out, csv_root=csvs, max_error_frac=1.0))
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["inputs"]["view_source"] == "metadata CSV"
    assert dataset["inputs"]["csv_files"]["split"].startswith(str(csvs))
    assert sorted(dataset["splits"]) == ["test", "train", "validate"]
    assert dataset["splits"]["train"]["num_samples"] == 3


def test_regions_are_packed(tmp_path):
    root = tmp_path / "dcm"
    mf.make_dicom_release(root)
    mask = np.zeros((40, 52), np.uint16)
    mask[5:20, 10:30] = 1 << 2
    (root / "regions").mkdir()
    Image.fromarray(mask).save(root / "regions" / "c-pa.png")
    with gzip.open(root / "mlip-synthetic-regions.csv.gz", "wt") as handle:
        handle.write("dicom_id,finding,bit,sentence\nc-pa,Pleural Effusion,2,small left pleural effusion\n")
    out = tmp_path / "out"
    pack(_options(root, out, max_error_frac=1.0))
    sample = _read_tar(out / "train-000000.tar")["10000001_50000001_c-pa"]
    meta = json.loads(sample["json"])
    assert meta["regions"] == {"Pleural Effusion": 2}
    assert meta["sentence_findings"] == [[], [], [], ["Pleural Effusion"]]
    stored = np.asarray(Image.open(io.BytesIO(sample["regions.png"])))
    assert stored.shape == (16, 21) and set(np.unique(stored)) == {0, 4}
    assert verify_shards(out, progress=False).ok


def test_cli_exit_codes_and_summary(dicom_root, tmp_path):
    base = [sys.executable, str(TOOL), "--root", str(dicom_root), "--size", "16", "--no-progress"]
    proc = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert proc.returncode == 1 and "packed 4 | skipped 4" in proc.stdout  # 50% > default 5%
    proc = subprocess.run(
        [*base, "--out", str(tmp_path / "b"), "--max-error-frac", "0.6"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [*base, "--out", str(tmp_path / "c"), "--views", "LL"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "nothing was packed" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(tmp_path), "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "cxr-record-list" in proc.stderr and "--csv-root" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    root = tmp_path / "many"
    mf.make_dicom_release(root, mf.many_studies(40))
    cmd = [
        sys.executable,
        str(TOOL),
        "--root",
        str(root),
        "--size",
        "64",
        "--shard-size",
        "2",
        "--no-progress",
    ]
    reference = tmp_path / "ref"
    subprocess.run([*cmd, "--out", str(reference)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists()  # it really died mid-way
    subprocess.run([*cmd, "--out", str(out), "--workers", "2"], check=True, capture_output=True)
    assert _tree_bytes(out) == _tree_bytes(reference)


@pytest.mark.slow
def test_make_synthetic_end_to_end(tmp_path):
    tool = REPO / "tools" / "make_synthetic.py"
    if not tool.is_file():
        pytest.skip("tools/make_synthetic.py not written yet")
    root = tmp_path / "synthetic"
    subprocess.run(
        [
            sys.executable,
            str(tool),
            "--out",
            str(root),
            "--studies",
            "20",
            "--image-size",
            "256",
            "--no-eval-sets",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "shards"
    make = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(root), "--out", str(out), "--size", "64", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert make.returncode == 0, make.stderr
    verify = subprocess.run(
        [sys.executable, str(TOOL), "--verify", str(out), "--no-progress"], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["counts"]["packed"] == 20 and "regions.png" in dataset["members"]
    import webdataset as wds

    urls = [str(out / n) for info in dataset["splits"].values() for n in info["shards"]]
    with_findings = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):  # raw bytes: PIL decode would drop 16 bits
        meta = json.loads(sample["json"])
        image, regions = Image.open(io.BytesIO(sample["png"])), Image.open(io.BytesIO(sample["regions.png"]))
        assert regions.mode == "I;16" and regions.size == image.size and min(image.size) == 64
        assert len(meta["sentence_findings"]) == len(meta["sentences"])
        mask = np.asarray(regions).astype(np.int64)
        for finding, bit in meta["regions"].items():
            assert (mask >> bit & 1).any(), (sample["__key__"], finding)  # each listed finding has pixels
        with_findings += any(meta["sentence_findings"])
    assert with_findings > 0
