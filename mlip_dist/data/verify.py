"""Re-read a shard folder and check it against its manifest and dataset.json.

:func:`verify_shards` opens every tar with the standard library ``tarfile`` (independent of
webdataset, which wrote them) and checks: every shard listed in dataset.json exists and no
unlisted ``*.tar`` lies beside them; no ``*.tmp`` is left; per shard, the keys and their order
equal the manifest's; each member's sha256 equals the manifest's; each sample has an image,
``txt`` and ``json`` member, its json parses and names the same subject/study/dicom ids, split
and sentence count as the key and manifest; keys are unique over the dataset; per split the
sample count equals dataset.json's ``num_samples``.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a tar in file order: (key, {extension: bytes}); key = name up to the first dot."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            handle = archive.extractfile(member)
            assert handle is not None
            data = handle.read()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = data
    return samples


def verify_shards(folder: str | Path, progress: bool = True) -> VerifyReport:
    """Check a make_shards output folder; the report lists every problem found (empty = valid)."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    report = VerifyReport()
    problems = report.problems
    dataset_path, manifest_path = folder / "dataset.json", folder / "manifest.parquet"
    for required in (dataset_path, manifest_path):
        if not required.is_file():
            problems.append(f"{required}: missing")
    if problems:
        return report
    dataset = json.loads(dataset_path.read_text())
    manifest = pq.read_table(manifest_path).to_pylist()
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for row in manifest:
        by_shard[row["shard"]].append(row)

    listed = {name for info in dataset["splits"].values() for name in info["shards"]}
    for path in sorted(folder.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: not listed in dataset.json")
    for path in sorted(folder.glob("*.tmp")):
        problems.append(f"{path.name}: unfinished temporary file")
    for name in sorted(set(by_shard) - listed):
        problems.append(f"manifest names shard {name} that dataset.json does not list")

    image_exts = {dataset.get("options", {}).get("image_format", "png")}
    seen_keys: set[str] = set()
    shard_names = [(split, name) for split, info in dataset["splits"].items() for name in info["shards"]]
    for split, name in tqdm(shard_names, desc="verify", unit="shard", disable=not progress):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in dataset.json but missing")
            continue
        try:
            samples = _read_shard(path)
        except (tarfile.TarError, OSError, EOFError) as err:
            problems.append(f"{name}: unreadable tar ({err})")
            continue
        report.shards += 1
        rows = by_shard.get(name, [])
        if [k for k, _ in samples] != [r["key"] for r in rows]:
            problems.append(
                f"{name}: keys differ from the manifest ({len(samples)} in tar, {len(rows)} in manifest)"
            )
        for (key, members), row in zip(samples, rows, strict=False):
            report.samples += 1
            where = f"{name}:{key}"
            if key in seen_keys:
                problems.append(f"{where}: duplicate key")
            seen_keys.add(key)
            if not image_exts & members.keys() or "txt" not in members or "json" not in members:
                problems.append(f"{where}: members {sorted(members)} lack image/txt/json")
                continue
            expected = json.loads(row["member_sha256"])
            actual = {ext: hashlib.sha256(data).hexdigest() for ext, data in members.items()}
            if actual != expected:
                bad = sorted(e for e in expected.keys() | actual.keys() if expected.get(e) != actual.get(e))
                problems.append(f"{where}: sha256 mismatch for {', '.join(bad)}")
            try:
                meta = json.loads(members["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(f"{where}: json member does not parse ({err})")
                continue
            if f"{meta.get('subject_id')}_{meta.get('study_id')}_{meta.get('dicom_id')}" != key:
                problems.append(f"{where}: json ids do not match the key")
            if meta.get("split") != split or row["split"] != split:
                problems.append(
                    f"{where}: split is {meta.get('split')!r}/{row['split']!r}, shard is in {split!r}"
                )
            if len(meta.get("sentences", [])) != row["n_sentences"]:
                problems.append(f"{where}: n_sentences differs from the manifest")
    for split, info in dataset["splits"].items():
        count = sum(len(by_shard.get(name, [])) for name in info["shards"])
        if count != info["num_samples"]:
            problems.append(
                f"split {split}: manifest has {count} samples, dataset.json says {info['num_samples']}"
            )
    if len(manifest) != sum(info["num_samples"] for info in dataset["splits"].values()):
        problems.append(f"manifest has {len(manifest)} rows, dataset.json counts differ")
    return report
