"""Synthetic MIMIC-CXR generator: layouts, determinism, labels vs text, regions, eval sets."""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pydicom
import pytest
from PIL import Image

from mlip_dist.data.synthetic import layouts
from mlip_dist.data.synthetic.findings import CHEXPERT_LABELS, COMPETITION, Label
from mlip_dist.data.synthetic.generator import ImageFormat, SyntheticConfig, generate, siim_image
from mlip_dist.data.synthetic.layouts import rle_decode, rle_encode
from mlip_dist.data.synthetic.reports import ReportStyle, sample_findings, write_report

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    """Every column as a string (so empty label cells stay distinguishable from 0.0)."""
    with open(path, "rb") as handle:
        header = handle.read()
    if path.suffix == ".gz":
        header = gzip.decompress(header)
    names = header.decode().splitlines()[0].split(",")
    options = pacsv.ConvertOptions(column_types={name: "string" for name in names}, strings_can_be_null=False)
    return pacsv.read_csv(path, convert_options=options).to_pylist()


def csv_columns(path: Path) -> list[str]:
    return pacsv.read_csv(path).column_names


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(SyntheticConfig(out=str(out), studies=40, seed=3, image_size=256, eval_images=24, progress=False))
    return out


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    common = dict(studies=6, image_size=128, eval_images=8, progress=False)
    generate(SyntheticConfig(out=str(tmp_path / "a"), seed=11, workers=1, **common))
    generate(SyntheticConfig(out=str(tmp_path / "b"), seed=11, workers=2, **common))
    generate(SyntheticConfig(out=str(tmp_path / "c"), seed=12, workers=1, **common))
    a, b, c = (all_files(tmp_path / name) for name in "abc")
    assert len(a) > 30 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert a["mimic-cxr-2.0.0-chexpert.csv.gz"] != c["mimic-cxr-2.0.0-chexpert.csv.gz"]


def test_mimic_layout_and_csv_columns(dataset):
    assert csv_columns(dataset / "cxr-record-list.csv.gz") == ["subject_id", "study_id", "dicom_id", "path"]
    assert csv_columns(dataset / "cxr-study-list.csv.gz") == ["subject_id", "study_id", "path"]
    assert csv_columns(dataset / "mimic-cxr-2.0.0-metadata.csv.gz") == [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
        "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]
    assert csv_columns(dataset / "mimic-cxr-2.0.0-split.csv.gz") == ["dicom_id", "study_id", "subject_id", "split"]
    chexpert_names = [
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
        "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
    ]
    for name in ("chexpert", "negbio"):
        assert csv_columns(dataset / f"mimic-cxr-2.0.0-{name}.csv.gz") == ["subject_id", "study_id", *chexpert_names]
    assert csv_columns(dataset / "mlip-synthetic-regions.csv.gz") == ["dicom_id", "finding", "bit", "sentence"]

    records = read_csv(dataset / "cxr-record-list.csv.gz")
    studies = read_csv(dataset / "cxr-study-list.csv.gz")
    assert len(studies) == 40 and len(records) > 40
    for row in records:
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", row["dicom_id"])
        s = row["subject_id"]
        assert row["path"] == f"files/p{s[:2]}/p{s}/s{row['study_id']}/{row['dicom_id']}.dcm"
        assert (dataset / row["path"]).is_file() and (dataset / "regions" / f"{row['dicom_id']}.png").is_file()
    for row in studies:
        assert row["path"].endswith(f"s{row['study_id']}.txt") and (dataset / row["path"]).is_file()
    splits = read_csv(dataset / "mimic-cxr-2.0.0-split.csv.gz")
    assert {row["split"] for row in splits} == {"train", "validate", "test"}
    by_subject: dict[str, set] = {}
    for row in splits:
        by_subject.setdefault(row["subject_id"], set()).add(row["split"])
    assert all(len(v) == 1 for v in by_subject.values()), "split must be by subject"
    labels = read_csv(dataset / "mimic-cxr-2.0.0-chexpert.csv.gz")
    values = {row[name] for row in labels for name in chexpert_names}
    assert values <= {"1.0", "0.0", "-1.0", ""} and {"1.0", "0.0", ""} <= values


def test_dicoms_are_12_bit_with_views_and_both_photometrics(dataset):
    metadata = {row["dicom_id"]: row for row in read_csv(dataset / "mimic-cxr-2.0.0-metadata.csv.gz")}
    photometrics, views = set(), set()
    for row in read_csv(dataset / "cxr-record-list.csv.gz"):
        ds = pydicom.dcmread(dataset / row["path"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and int(pixels.max()) <= 4095
        meta = metadata[row["dicom_id"]]
        assert (ds.Rows, ds.Columns) == (int(meta["Rows"]), int(meta["Columns"])) == pixels.shape
        assert ds.ViewPosition == meta["ViewPosition"] and str(ds.PatientID) == row["subject_id"]
        assert max(ds.Rows, ds.Columns) <= 256 and min(ds.Rows, ds.Columns) >= 150
        photometrics.add(ds.PhotometricInterpretation)
        views.add(ds.ViewPosition)
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert views == {"PA", "AP", "LL"}


def _display(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)
    return 4095.0 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels


def test_frontal_images_look_like_chest_radiographs(dataset):
    metadata = {row["dicom_id"]: row for row in read_csv(dataset / "mimic-cxr-2.0.0-metadata.csv.gz")}
    darker = total = 0
    for row in read_csv(dataset / "cxr-record-list.csv.gz"):
        if metadata[row["dicom_id"]]["ViewPosition"] == "LL":
            continue
        image = _display(dataset / row["path"])
        h, w = image.shape
        mediastinum = image[int(0.3 * h) : int(0.5 * h), int(0.47 * w) : int(0.53 * w)].mean()
        lungs = np.concatenate([
            image[int(0.3 * h) : int(0.5 * h), int(0.24 * w) : int(0.32 * w)].ravel(),
            image[int(0.3 * h) : int(0.5 * h), int(0.68 * w) : int(0.76 * w)].ravel(),
        ]).mean()
        corner = image[: h // 20, : w // 20].mean()  # air outside the body
        total += 1
        darker += lungs < 0.8 * mediastinum and corner < lungs
        assert image.std() > 200, "an image needs contrast"
    assert total >= 30 and darker >= 0.9 * total


def _study_of(dataset: Path) -> dict[str, tuple[str, str]]:
    return {row["dicom_id"]: (row["subject_id"], row["study_id"]) for row in read_csv(dataset / "cxr-record-list.csv.gz")}


def test_region_masks_exactly_for_positive_findings(dataset):
    labels = {(r["subject_id"], r["study_id"]): r for r in read_csv(dataset / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    regions = read_csv(dataset / "mlip-synthetic-regions.csv.gz")
    rows_by_image: dict[str, set] = {}
    for row in regions:
        assert int(row["bit"]) == CHEXPERT_LABELS.index(row["finding"])
        rows_by_image.setdefault(row["dicom_id"], set()).add(row["finding"])
    positives_seen = 0
    for dicom_id, study in _study_of(dataset).items():
        mask = np.array(Image.open(dataset / "regions" / f"{dicom_id}.png"))
        assert mask.dtype == np.uint16
        ds = pydicom.dcmread(next((dataset / "files").rglob(f"{dicom_id}.dcm")), stop_before_pixels=True)
        assert mask.shape == (ds.Rows, ds.Columns)
        present = {name for bit, name in enumerate(CHEXPERT_LABELS) if (mask >> bit & 1).any()}
        positive = {name for name in CHEXPERT_LABELS if labels[study][name] == "1.0" and name != "No Finding"}
        assert present == positive, (dicom_id, present, positive)
        assert rows_by_image.get(dicom_id, set()) == positive
        for name in positive:  # not trivially one pixel
            assert (mask >> CHEXPERT_LABELS.index(name) & 1).sum() >= 12
        positives_seen += len(positive)
    assert positives_seen >= 20


def test_regions_lie_where_the_sentence_says(dataset):
    """Radiological convention: the patient's left is on the image right."""
    metadata = {row["dicom_id"]: row for row in read_csv(dataset / "mimic-cxr-2.0.0-metadata.csv.gz")}
    checked = 0
    for row in read_csv(dataset / "mlip-synthetic-regions.csv.gz"):
        if metadata[row["dicom_id"]]["ViewPosition"] == "LL":
            continue
        sentence = row["sentence"].lower()
        mask = np.array(Image.open(dataset / "regions" / f"{row['dicom_id']}.png")) >> int(row["bit"]) & 1
        ys, xs = np.nonzero(mask)
        h, w = mask.shape
        cx, cy = xs.mean() / w, ys.mean() / h
        sides = [s for s in ("left", "right") if re.search(rf"\b{s}\b", sentence)]
        if row["finding"] in ("Pleural Effusion", "Atelectasis", "Consolidation", "Lung Opacity", "Pneumonia", "Pneumothorax", "Lung Lesion") and len(sides) == 1 and "subclavian" not in sentence:
            assert (cx > 0.5) == (sides[0] == "left"), (sentence, cx)
            checked += 1
        if row["finding"] == "Pleural Effusion":
            assert cy > 0.5, (sentence, cy)
        if "upper lobe" in sentence or "apical" in sentence:
            assert cy < 0.5, (sentence, cy)
        if "lower lobe" in sentence or "basilar" in sentence or "base" in sentence:
            assert cy > 0.4, (sentence, cy)
        if row["finding"] == "Cardiomegaly":
            assert 0.4 < cx < 0.7 and cy > 0.45
    assert checked >= 5


# -- an independent rule-based labeller (keywords + negation/hedge cues), the reference -------
KEYWORDS = {
    "Pleural Effusion": r"effusion", "Pneumothorax": r"pneumothorax", "Consolidation": r"consolidation",
    "Pneumonia": r"pneumonia", "Edema": r"edema", "Cardiomegaly": r"cardiomegaly|\bheart\b|cardiac silhouette",
    "Enlarged Cardiomediastinum": r"mediastin", "Lung Opacity": r"opacity", "Atelectasis": r"atelectasis",
    "Lung Lesion": r"nodule|mass", "Support Devices": r"\btube\b|catheter|\bline\b|pacemaker",
}


def reference_labels(report: str) -> dict[str, float | None]:
    match = re.search(r"^\s*(findings|impression|portable chest)", report, flags=re.IGNORECASE | re.MULTILINE)
    assert match is not None
    body = " ".join(line.strip() for line in report[match.start():].splitlines())
    body = re.sub(r"(findings and impression|findings|impression|portable chest)\s*:", " ", body, flags=re.IGNORECASE)
    body = re.sub(r"(^|\s)\d+\.\s", " ", body)
    best: dict[str, float] = {}
    rank = {1.0: 3, -1.0: 2, 0.0: 1}
    for sentence in re.split(r"(?<=\.)\s+", body):
        s = sentence.lower()
        if re.search(r"possibl|cannot be excluded|cannot exclude", s):
            value = -1.0
        elif re.search(r"^no\b|\bno\b|\bnot\b|\bnormal\b", s):
            value = 0.0
        else:
            value = 1.0
        for name, pattern in KEYWORDS.items():
            if re.search(pattern, s) and (name not in best or rank[value] > rank[best[name]]):
                best[name] = value
    out: dict[str, float | None] = {name: best.get(name) for name in CHEXPERT_LABELS}
    abnormal = any(v in (1.0, -1.0) for k, v in best.items() if k != "Support Devices")
    out["No Finding"] = None if abnormal else 1.0
    return out


def test_written_labels_agree_with_report_text(dataset):
    for row in read_csv(dataset / "mimic-cxr-2.0.0-chexpert.csv.gz"):
        s = row["subject_id"]
        text = (dataset / f"files/p{s[:2]}/p{s}/s{row['study_id']}.txt").read_text()
        expected = reference_labels(text)
        got = {name: (float(row[name]) if row[name] else None) for name in CHEXPERT_LABELS}
        assert got == expected, text


def test_report_variants_and_hedged_negated_labels():
    styles, numbered, wrapped = set(), 0, 0
    seen = {1.0: 0, 0.0: 0, -1.0: 0}
    for index in range(400):
        rng = np.random.default_rng(index)
        report = write_report(sample_findings(rng), rng, exam="CHEST (PA AND LAT)", indication="___-year-old man with cough.")
        text = report.text
        assert text.lstrip().startswith("FINAL REPORT") and "EXAMINATION:" in text and "INDICATION:  ___" in text
        assert "COMPARISON:" in text
        headings = {m.upper() for m in re.findall(r"^ *([A-Za-z ]+?) *:", text, flags=re.MULTILINE)}
        if report.style is ReportStyle.STANDARD:
            assert {"FINDINGS", "IMPRESSION"} <= headings
        elif report.style is ReportStyle.IMPRESSION_ONLY:
            assert "IMPRESSION" in headings and "FINDINGS" not in headings
        elif report.style is ReportStyle.COMBINED:
            assert "FINDINGS AND IMPRESSION" in headings
        else:
            assert not headings & {"FINDINGS", "IMPRESSION", "FINDINGS AND IMPRESSION"}
        if report.numbered:
            assert re.search(r"^ 1\. .*\n(.*\n)* 2\. ", text, flags=re.MULTILINE)
        if report.wrapped:
            assert any(line.startswith(" ") and not line.rstrip().endswith(".") and len(line) > 40 for line in text.splitlines())
        styles.add(report.style)
        numbered += report.numbered
        wrapped += report.wrapped
        assert report.labels == reference_labels(text), text
        for value in report.labels.values():
            if value is not None:
                seen[value] += 1
        for sentence in (s for sentences in report.sentences_by_finding.values() for s in sentences):
            assert sentence in " ".join(line.strip() for line in text.splitlines())
    assert styles == set(ReportStyle) and numbered > 10 and wrapped > 100
    assert min(seen.values()) > 20


def test_rle_round_trip_and_reference_encoder():
    def mask2rle_reference(img, width, height):  # the SIIM-ACR competition's code, called with mask.T
        rle, last, current, start, length = [], 0, 0, -1, 0
        for x in range(width):
            for y in range(height):
                color = img[x][y]
                if color != last:
                    if color == 255:
                        start, length = current, 1
                    else:
                        rle += [str(start), str(length)]
                        start, length, current = -1, 0, 0
                elif start > -1:
                    length += 1
                last = color
                current += 1
        return " ".join(rle)

    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(5, 40, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.6)
        mask[-1, -1] = False  # the reference drops a run that touches the last pixel
        assert rle_encode(mask) == mask2rle_reference((mask * 255).T, w, h)
        mask[-1, -1] = True
        assert np.array_equal(rle_decode(rle_encode(mask), h, w), mask)
    assert rle_encode(np.zeros((4, 4), bool)) == "-1" and not rle_decode("-1", 4, 4).any()


def test_siim_set(dataset):
    text = (dataset / "siim" / "train-rle.csv").read_text().splitlines()
    assert text[0] == "ImageId, EncodedPixels"
    assert csv_columns(dataset / "siim" / "train-rle.csv") == ["ImageId", " EncodedPixels"]
    files = {p.stem: p for p in (dataset / "siim" / "dicom-images-train").rglob("*.dcm")}
    positives = 0
    for line in text[1:]:
        image_id, rle = line.split(", ")
        path = files[image_id]
        assert path.parent.parent.parent.name == "dicom-images-train"
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == image_id and ds.pixel_array.shape == (ds.Rows, ds.Columns)
        mask = rle_decode(rle, ds.Rows, ds.Columns)
        assert (rle == "-1") == (not mask.any())
        if mask.any():
            positives += 1
            assert rle_encode(mask) == rle
    assert positives >= 1 and len(files) == 12
    config = SyntheticConfig(out=str(dataset / "siim-extra"), seed=5, image_size=128)
    multi = next(rows for rows in (siim_image(i, config) for i in range(200)) if len(rows) >= 2)
    first, second = (rle_decode(rle, 128, 128) for _, rle in multi[:2])
    assert multi[0][0] == multi[1][0] and first.any() and second.any() and not (first & second).any()
    assert (np.nonzero(first)[1].mean() < 64) != (np.nonzero(second)[1].mean() < 64)  # one per lung


def test_rsna_set(dataset):
    path = dataset / "rsna" / "stage_2_train_labels.csv"
    assert csv_columns(path) == ["patientId", "x", "y", "width", "height", "Target"]
    rows = read_csv(path)
    assert {r["Target"] for r in rows} == {"0", "1"}
    for row in rows:
        ds = pydicom.dcmread(dataset / "rsna" / "stage_2_train_images" / f"{row['patientId']}.dcm")
        assert ds.BitsStored == 8 and ds.PatientID == row["patientId"]
        if row["Target"] == "1":
            x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
            assert x >= 0 and y >= 0 and w > 2 and h > 2 and x + w <= ds.Columns and y + h <= ds.Rows
        else:
            assert row["x"] == row["width"] == ""
    classes = read_csv(dataset / "rsna" / "stage_2_detailed_class_info.csv")
    assert {c["patientId"] for c in classes} == {r["patientId"] for r in rows}


def test_chexpert_set_has_single_finding_positives(dataset):
    base = dataset / "chexpert" / "CheXpert-v1.0-small"
    expected_columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                        "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                        "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    only = {label.value: 0 for label in COMPETITION}
    for split in ("train", "valid"):
        assert csv_columns(base / f"{split}.csv") == expected_columns
        for row in read_csv(base / f"{split}.csv"):
            assert re.fullmatch(rf"CheXpert-v1.0-small/{split}/patient\d{{5}}/study1/view\d_(frontal|lateral)\.jpg", row["Path"])
            image = Image.open(dataset / "chexpert" / row["Path"])
            assert image.mode == "L" and max(image.size) <= 390
            if split == "valid":
                assert all(row[name] in ("0.0", "1.0") for name in expected_columns[5:])
            positive = [name for name in expected_columns[5:] if row[name] in ("1.0", "-1.0")]
            if row["Frontal/Lateral"] == "Frontal" and len(positive) == 1 and positive[0] in only:
                only[positive[0]] += 1
    assert all(count >= 2 for count in only.values()), only


def test_cli_jpg_format(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_synthetic
    finally:
        sys.path.pop(0)
    assert make_synthetic.main(["--out", str(tmp_path), "--studies", "4", "--format", "jpg", "--image-size", "96",
                                "--no-eval-sets", "--no-progress"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz",
            "mimic-cxr-2.0.0-negbio.csv.gz", "IMAGE_FILENAMES", "files", "regions"} <= names
    assert "chexpert" not in names
    listed = (tmp_path / "IMAGE_FILENAMES").read_text().split()
    assert listed and all(name.endswith(".jpg") and (tmp_path / name).is_file() for name in listed)
    image = Image.open(tmp_path / listed[0])
    assert image.format == "JPEG" and image.mode == "L"
    assert len(list((tmp_path / "files").rglob("*.txt"))) == 4
    assert make_synthetic.main(["--out", str(tmp_path), "--studies", "0"]) == 2


def test_format_enum_and_label_bits():
    assert ImageFormat("dicom") is ImageFormat.DICOM
    assert [label.bit for label in Label] == list(range(14))
    assert layouts.format_label(None) == "" and layouts.format_label(-1.0) == "-1.0"
