"""Evaluation benchmarks: readers, the 5x200 rule, seeded splits without leakage, region codecs,
prompt sets and the shard packer (tools/make_eval_shards.py) on tiny data in the public layouts."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import load_tool
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from mlip_dist.data.mimic import CHEXPERT_LABELS
from mlip_dist.evaluation import benchmarks as B

REPO = Path(__file__).resolve().parent.parent


tool = load_tool("make_eval_shards")


# --------------------------------------------------------------------------- fixtures in the public layouts


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125." + str(abs(hash(path.name)) % 10**12)
    ds.set_pixel_data(pixels.astype(np.uint16), "MONOCHROME2", 12)
    ds.save_as(path, enforce_file_format=True)


def _labels(**values):
    row = {name: "" for name in CHEXPERT_LABELS}
    for key, value in values.items():
        row[key.replace("_", " ")] = value
    return row


def make_chexpert(root: Path, rows_shuffle_seed: int | None = None) -> list[dict]:
    """Candidates per class: 3 exclusive positives each (Edema only 1) plus traps that must never be chosen."""
    base = root / "CheXpert-v1.0-small"
    rows = []
    patient = 0

    def add(view, **labels):
        nonlocal patient
        patient += 1
        rel = f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view1_{view.lower()}.jpg"
        image = root / rel
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 48), patient * 3 % 256, np.uint8)).save(image, quality=90)
        rows.append(
            {
                "Path": rel,
                "Sex": "Female",
                "Age": "60",
                "Frontal/Lateral": view,
                "AP/PA": "AP" if view == "Frontal" else "",
                **_labels(**labels),
            }
        )

    for name in B.COMPETITION_FINDINGS:
        key = name.replace(" ", "_")
        count = 1 if name == "Edema" else 3
        for i in range(count):
            extra = {"Support_Devices": "1.0"} if i == 0 else {}
            add("Frontal", **{key: "1.0"}, **extra)
    # Uncertain on another competition finding is "not positive": qualifies for Cardiomegaly.
    add("Frontal", Cardiomegaly="1.0", Edema="-1.0", Atelectasis="0.0")
    # Traps: two competition positives; lateral; uncertain only; positive only for a non-competition label.
    add("Frontal", Atelectasis="1.0", Consolidation="1.0")
    add("Lateral", Edema="1.0")
    add("Frontal", Edema="-1.0")
    add("Frontal", Pneumonia="1.0")
    if rows_shuffle_seed is not None:
        order = np.random.default_rng(rows_shuffle_seed).permutation(len(rows))
        rows = [rows[i] for i in order]
    with (base / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
        )
        writer.writeheader()
        writer.writerows(rows)
    return rows


RSNA_H, RSNA_W = 80, 120  # stored 40x60 at --size 40 (scale exactly 0.5)


def make_rsna(root: Path, n_patients: int = 10) -> dict[str, list[tuple[int, int, int, int]]]:
    boxes_by_patient = {}
    rows = []
    for index in range(n_patients):
        pid = f"{index:04x}a1b2-c3d4-e5f6-{index:012d}"
        pixels = np.full((RSNA_H, RSNA_W), 400, np.uint16)
        boxes = []
        if index % 2 == 0:
            boxes.append((10 + 2 * index, 20, 24, 16))
            if index % 4 == 0:
                boxes.append((80, 50, 30, 20))
        for x, y, w, h in boxes:
            pixels[y : y + h, x : x + w] = 3500  # bright where the box is: image and box must stay aligned
            rows.append([pid, str(float(x)), str(float(y)), str(float(w)), str(float(h)), "1"])
        if not boxes:
            rows.append([pid, "", "", "", "", "0"])
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", pixels)
        boxes_by_patient[pid] = boxes
    with (root / "stage_2_train_labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(rows)
    return boxes_by_patient


SIIM_H, SIIM_W = 48, 64  # non-square so that a row/column-major mix-up shows; stored 24x32 at --size 24


def make_siim(root: Path, n_images: int = 8) -> dict[str, np.ndarray]:
    masks = {}
    rows = []
    for index in range(n_images):
        image_id = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + index}.1517875201.{index}"
        mask = np.zeros((SIIM_H, SIIM_W), bool)
        if index % 3 != 2:
            mask[4 + 2 * index : 20 + 2 * index, 10:30] = True
            rows.append([image_id, " " + B.rle_encode(mask)])
            if index % 3 == 1:
                second = np.zeros_like(mask)
                second[30:40, 40:60] = True
                rows.append([image_id, " " + B.rle_encode(second)])
                mask |= second
        else:
            rows.append([image_id, " -1"])
        pixels = np.where(mask, 3000, 300).astype(np.uint16)
        write_dicom(
            root
            / "dicom-images-train"
            / f"1.2.276.study{index}"
            / f"1.2.276.series{index}"
            / f"{image_id}.dcm",
            pixels,
        )
        masks[image_id] = mask
    with (root / "train-rle.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", " EncodedPixels"])  # the release's header has the leading space
        writer.writerows(rows)
    return masks


def read_shards(out: Path) -> dict[str, list[dict]]:
    """Samples per split, read back with plain webdataset from the shards dataset.json lists."""
    dataset = json.loads((out / "dataset.json").read_text())
    samples = {}
    for split, entry in dataset["splits"].items():
        urls = [str(out / name) for name in entry["shards"]]
        samples[split] = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []
    return samples


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# --------------------------------------------------------------------------- region codecs


def _siim_reference_rle2mask(rle: str, width: int, height: int) -> np.ndarray:
    """The competition's mask_functions.rle2mask, verbatim logic (used transposed by its kernels)."""
    mask = np.zeros(width * height)
    array = np.asarray([int(x) for x in rle.split()])
    starts, lengths = array[0::2], array[1::2]
    current_position = 0
    for index, start in enumerate(starts):
        current_position += start
        mask[current_position : current_position + lengths[index]] = 255
        current_position += lengths[index]
    return mask.reshape(width, height)


def test_rle_hand_example_is_relative_and_column_major():
    # "1 2 3 1": run at 1 of length 2, then 3 after its end (pixel 6) of length 1; column-major, H=3.
    expected = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(B.rle_decode("1 2 3 1", 3, 4), expected)
    assert B.rle_encode(expected) == "1 2 3 1"
    assert not B.rle_decode(" -1", 3, 4).any() and B.rle_encode(np.zeros((3, 4), bool)) == "-1"
    with pytest.raises(ValueError, match="past the image end"):
        B.rle_decode("10 5", 3, 4)
    with pytest.raises(ValueError, match="odd"):
        B.rle_decode("1 2 3", 3, 4)


def test_rle_round_trip_and_competition_reference():
    rng = np.random.default_rng(0)
    for shape in [(16, 16), (9, 13), (13, 9)]:
        mask = rng.random(shape) < 0.3
        mask[0, 0] = True  # a run starting at pixel 0 (first gap 0)
        rle = B.rle_encode(mask)
        np.testing.assert_array_equal(B.rle_decode(rle, *shape), mask)
        if shape[0] == shape[1]:
            np.testing.assert_array_equal(_siim_reference_rle2mask(rle, shape[1], shape[0]).T > 0, mask)


def test_union_of_rle_rows_and_boxes_to_mask():
    a = np.zeros((6, 5), bool)
    a[1:3, 1:2] = True
    b = np.zeros((6, 5), bool)
    b[4:6, 3:5] = True
    np.testing.assert_array_equal(B.union_rle_mask([B.rle_encode(a), "-1", B.rle_encode(b)], 6, 5), a | b)
    mask = B.boxes_to_mask([B.Box(1, 2, 3, 2), B.Box(4.6, 0, 10, 1)], 5, 6)
    expected = np.zeros((5, 6), bool)
    expected[2:4, 1:4] = True
    expected[0, 5] = True  # centre 5.5 >= 4.6; clipped at the right edge; column 4 (centre 4.5) not inside
    np.testing.assert_array_equal(mask, expected)


# --------------------------------------------------------------------------- splits and readers


def test_assign_splits_fractions_order_independence_and_seed():
    ids = [f"id{i}" for i in range(100)]
    splits = B.assign_splits(ids, seed=3)
    counts = {name: sum(1 for s in splits.values() if s == name) for name in B.SPLITS}
    assert counts == {"train": 70, "validate": 15, "test": 15}
    assert (
        B.assign_splits(list(reversed(ids)) + ids[:10], seed=3) == splits
    )  # order and duplicates do not matter
    assert B.assign_splits(ids, seed=4) != splits
    with pytest.raises(ValueError, match="sum to 1"):
        B.assign_splits(ids, fractions=(0.5, 0.2, 0.2))


def test_chexpert_5x200_rule_and_determinism(tmp_path):
    make_chexpert(tmp_path / "a")
    make_chexpert(tmp_path / "b", rows_shuffle_seed=7)
    plan = B.plan_chexpert_5x200(tmp_path / "a", per_class=2, seed=0)
    per_class = {name: [i for i in plan.items if i.class_name == name] for name in B.COMPETITION_FINDINGS}
    assert {k: len(v) for k, v in per_class.items()} == {
        "Atelectasis": 2,
        "Cardiomegaly": 2,
        "Consolidation": 2,
        "Edema": 1,
        "Pleural Effusion": 2,
    }
    # The uncertain-Edema image qualifies for Cardiomegaly; the traps qualify for nothing.
    assert plan.info["available"] == {
        "Atelectasis": 3,
        "Cardiomegaly": 4,
        "Consolidation": 3,
        "Edema": 1,
        "Pleural Effusion": 3,
    }
    assert len(plan.warnings) == 1 and "Edema" in plan.warnings[0]
    records = {r.path: r for r in B.read_chexpert_csv(tmp_path / "a" / "CheXpert-v1.0-small" / "train.csv")}
    for item in plan.items:
        record = records[item.source]
        assert record.frontal and item.split == "test"
        assert B.COMPETITION_FINDINGS[item.class_index] == item.class_name
        assert record.labels[item.class_name] == 1.0
        assert all(record.labels[o] != 1.0 for o in B.COMPETITION_FINDINGS if o != item.class_name)
    # Row order of the CSV does not change the subset; the seed does (for some seed).
    shuffled = B.plan_chexpert_5x200(tmp_path / "b", per_class=2, seed=0)
    assert [i.source for i in shuffled.items] == [i.source for i in plan.items]
    others = [
        [i.source for i in B.plan_chexpert_5x200(tmp_path / "a", per_class=2, seed=s).items]
        for s in range(1, 6)
    ]
    assert any(o != [i.source for i in plan.items] for o in others)


def test_rsna_reader_groups_boxes_and_rejects_bad_rows(tmp_path):
    boxes = make_rsna(tmp_path, n_patients=6)
    records = B.read_rsna_labels(tmp_path / "stage_2_train_labels.csv")
    assert {p: [b.as_list() for b in r.boxes] for p, r in records.items()} == {
        p: [[float(v) for v in b] for b in bs] for p, bs in boxes.items()
    }
    assert all(r.target == int(bool(boxes[p])) for p, r in records.items())
    bad = tmp_path / "bad.csv"
    bad.write_text("patientId,x,y,width,height,Target\np1,1,2,3,4,1\np1,,,,,0\n")
    with pytest.raises(B.BenchmarkDataError, match=r"bad.csv:3: patient p1 has rows with Target 0 and 1"):
        B.read_rsna_labels(bad)


def test_prompts_cover_classes_with_method_templates(tmp_path):
    prompts = B.load_prompts()
    assert set(CHEXPERT_LABELS) <= set(prompts) and {"Pneumonia", "Pneumothorax"} <= set(prompts)
    raw = json.loads((REPO / "mlip_dist" / "resources" / "prompts.json").read_text())
    templated = [name for name, entry in raw["classes"].items() if entry["templated"]]
    assert {
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
        "Pneumonia",
        "Pneumothorax",
    } <= set(templated)
    for name in templated:
        finding = raw["classes"][name]["finding"]
        assert f"There is {finding}." in prompts[name].positive
        assert {f"There is no {finding}.", f"No evidence of {finding}."} <= set(prompts[name].negative)
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps({"classes": {"X": {"positive": ["There is x."], "negative": ["There is x."]}}}))
    with pytest.raises(B.BenchmarkDataError, match="both positive and negative"):
        B.load_prompts(bad)


# --------------------------------------------------------------------------- packer


def test_pack_rsna_boxes_masks_splits_and_counts(tmp_path):
    boxes = make_rsna(tmp_path / "rsna", n_patients=10)
    out = tmp_path / "out"
    assert (
        tool.main(
            [
                "--benchmark",
                "rsna",
                "--root",
                str(tmp_path / "rsna"),
                "--out",
                str(out),
                "--size",
                "40",
                "--shard-size",
                "3",
            ]
        )
        == 0
    )
    dataset = json.loads((out / "dataset.json").read_text())
    samples = read_shards(out)
    assert {s: len(v) for s, v in samples.items()} == {s: e["num_samples"] for s, e in dataset["splits"].items()}
    assert {s: e["num_samples"] for s, e in dataset["splits"].items()} == {"train": 7, "validate": 2, "test": 1}
    assert len(dataset["splits"]["train"]["shards"]) == 3  # 7 samples, 3 per shard
    seen = {}
    for split, split_samples in samples.items():
        for sample in split_samples:
            meta = json.loads(sample["json"])
            assert meta["id"] not in seen, "a patient landed in two splits"
            seen[meta["id"]] = split
            assert meta["split"] == split and sample["__key__"] == B.shard_key(meta["id"])
            image, mask = png_array(sample["png"]), png_array(sample["mask.png"])
            assert image.shape == mask.shape == (40, 60) and meta["orig_size"] == [RSNA_H, RSNA_W]
            expected_boxes = [[v / 2 for v in b] for b in boxes[meta["id"]]]
            assert meta["boxes"] == expected_boxes and meta["label"] == int(bool(expected_boxes))
            expected_mask = np.zeros((40, 60), bool)
            for x, y, w, h in boxes[meta["id"]]:
                expected_mask[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2] = True
            np.testing.assert_array_equal(mask == 255, expected_mask)
            assert set(np.unique(mask)) <= {0, 255}
            if expected_mask.any():  # the bright rectangle of the image sits under the mask
                assert image[expected_mask].min() > image[~expected_mask].max()
    assert seen == dict(csv.reader((out / "splits.csv").read_text().splitlines()[1:]))
    assert set(seen) == set(boxes)


def test_pack_siim_masks_union_and_image_level_split(tmp_path):
    masks = make_siim(tmp_path / "siim", n_images=8)
    out = tmp_path / "out"
    tool.main(
        [
            "--benchmark",
            "siim",
            "--root",
            str(tmp_path / "siim"),
            "--out",
            str(out),
            "--size",
            "24",
            "--seed",
            "1",
        ]
    )
    samples = read_shards(out)
    split_of = {}
    for split, split_samples in samples.items():
        for sample in split_samples:
            meta = json.loads(sample["json"])
            assert meta["id"] not in split_of  # a multi-row image is one sample in one split
            split_of[meta["id"]] = split
            assert "." not in sample["__key__"]
            mask, image = png_array(sample["mask.png"]) == 255, png_array(sample["png"])
            expected = masks[meta["id"]].reshape(24, 2, 32, 2)[
                :, 0, :, 0
            ]  # 2x nearest downsample of the union
            np.testing.assert_array_equal(mask, expected)
            assert meta["label"] == int(expected.any()) == int(meta["labels"]["Pneumothorax"])
            if expected.any():
                assert image[mask].min() > image[~mask].max()
    assert set(split_of) == set(masks)
    csv_rows = list(csv.DictReader((out / "splits.csv").read_text().splitlines()))
    assert {r["id"]: r["split"] for r in csv_rows} == split_of
    # The split depends only on the ImageId set and the seed.
    assert split_of == B.assign_splits(masks, seed=1)


def test_pack_is_deterministic_and_reports_missing_images(tmp_path):
    make_siim(tmp_path / "siim", n_images=5)
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        tool.main(
            ["--benchmark", "siim", "--root", str(tmp_path / "siim"), "--out", str(out), "--size", "24"]
        )
        runs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert runs[0] == runs[1]
    # Byte-identical across time too: tar headers carry a fixed mtime, not the clock.
    with tarfile.open(tmp_path / "one" / "train-000000.tar") as archive:
        assert {m.mtime for m in archive.getmembers()} == {0}
    assert not any(name.endswith(".tmp") for name in runs[0])
    # An image named in the CSV without its DICOM is skipped and listed, counts follow.
    missing = next((tmp_path / "siim" / "dicom-images-train").rglob("*.dcm"))
    missing.unlink()
    out = tmp_path / "three"
    tool.main(["--benchmark", "siim", "--root", str(tmp_path / "siim"), "--out", str(out), "--size", "24"])
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == [missing.stem] and errors[0]["reason"] == "missing_file"
    dataset = json.loads((out / "dataset.json").read_text())
    assert (
        sum(e["num_samples"] for e in dataset["splits"].values())
        == 4
        == sum(len(v) for v in read_shards(out).values())
    )


def test_pack_chexpert_5x200(tmp_path):
    make_chexpert(tmp_path / "chexpert")
    out = tmp_path / "out"
    tool.main(
        [
            "--benchmark",
            "chexpert5x200",
            "--root",
            str(tmp_path / "chexpert"),
            "--out",
            str(out),
            "--size",
            "20",
            "--per-class",
            "2",
        ]
    )
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["classes"] == list(B.COMPETITION_FINDINGS) and len(dataset["warnings"]) == 1
    (test_samples,) = read_shards(out).values()
    assert len(test_samples) == dataset["splits"]["test"]["num_samples"] == 9
    plan = B.plan_chexpert_5x200(tmp_path / "chexpert", per_class=2, seed=0)
    for sample, item in zip(test_samples, plan.items, strict=True):
        meta = json.loads(sample["json"])
        assert meta["id"] == item.sample_id and meta["class"] == item.class_index
        assert meta["class_name"] == B.COMPETITION_FINDINGS[meta["class"]]
        assert meta["labels"][meta["class_name"]] == 1.0
        assert png_array(sample["png"]).shape == (20, 24)  # 40x48 -> shorter side 20
        assert "mask.png" not in sample


# --------------------------------------------------------------------------- with the synthetic generator


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    generator = pytest.importorskip("mlip_dist.data.synthetic.generator")
    root = tmp_path_factory.mktemp("synthetic")
    config = generator.SyntheticConfig(
        out=str(root), studies=8, seed=0, image_size=128, eval_images=40, workers=1, progress=False
    )
    generator.generate(config)
    return root


@pytest.mark.parametrize(
    "benchmark, folder", [("chexpert5x200", "chexpert"), ("rsna", "rsna"), ("siim", "siim")]
)
def test_pack_synthetic_eval_sets(synthetic_root, tmp_path, benchmark, folder):
    out = tmp_path / benchmark
    root = synthetic_root / folder
    tool.main(
        ["--benchmark", benchmark, "--root", str(root), "--out", str(out), "--size", "48", "--per-class", "4"]
    )
    dataset = json.loads((out / "dataset.json").read_text())
    samples = read_shards(out)
    assert dataset["skipped"] == 0
    assert {s: len(v) for s, v in samples.items()} == {s: e["num_samples"] for s, e in dataset["splits"].items()}
    metas = {split: [json.loads(s["json"]) for s in v] for split, v in samples.items()}
    ids = [m["id"] for v in metas.values() for m in v]
    assert len(ids) == len(set(ids))  # no id in two splits
    assert {r["id"]: r["split"] for r in csv.DictReader((out / "splits.csv").read_text().splitlines())} == {
        m["id"]: s for s, v in metas.items() for m in v
    }
    if benchmark == "chexpert5x200":
        records = {r.path: r for r in B.read_chexpert_csv(root / "CheXpert-v1.0-small" / "train.csv")}
        for meta in metas["test"]:
            record = records[meta["source"]]
            assert record.frontal and record.labels[meta["class_name"]] == 1.0
            assert all(record.labels[o] != 1.0 for o in B.COMPETITION_FINDINGS if o != meta["class_name"])
        return
    assert set(dataset["splits"]) == {"train", "validate", "test"}
    for split_samples in samples.values():
        for sample in split_samples:
            meta = json.loads(sample["json"])
            mask = png_array(sample["mask.png"])
            assert mask.shape == png_array(sample["png"]).shape == tuple(meta["size"])
            assert meta["label"] == int(mask.any())
            if benchmark == "rsna":
                sy, sx = meta["size"][0] / meta["orig_size"][0], meta["size"][1] / meta["orig_size"][1]
                expected = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in meta["boxes_orig"]]
                np.testing.assert_allclose(
                    np.array(meta["boxes"]).reshape(-1, 4), np.array(expected).reshape(-1, 4)
                )
