"""tools/ablate.py: the study table (means and spreads over seeds, partial studies, missing metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool


@pytest.fixture(scope="module")
def ablate():
    return load_tool("ablate")


def fake_results(auc: float, dice: float | None) -> dict:
    results = {"zero_shot": {"mean_auc_combined": auc}, "retrieval": {"image_to_report": {"R@10": auc / 2}}}
    if dice is not None:
        results["segmentation"] = {"1%": {"dice": dice}}
    return results


def test_table_means_spreads_and_seed_column(ablate):
    results = {"a": {0: fake_results(0.70, 0.10), 1: fake_results(0.74, 0.20), 2: fake_results(0.75, None)},
               "d": {1: fake_results(0.80, 0.30)},
               "b": {}}
    markdown, summary = ablate.table(results)
    rows = {line.split(":")[0].strip("| "): line for line in markdown.splitlines()[2:]}
    assert set(rows) == {"a", "d"}  # a row with no finished run is left out, not printed as zeros
    assert summary["a"]["seeds"] == [0, 1, 2] and summary["d"]["seeds"] == [1]
    cells = [cell.strip() for cell in rows["a"].split("|")[1:-1]]
    names = ["row", "seeds", *ablate.METRICS]
    by_name = dict(zip(names, cells, strict=True))
    auc = np.array([0.70, 0.74, 0.75])
    assert by_name["seeds"] == "0,1,2"
    assert by_name["zero-shot AUC (combined)"] == f"{auc.mean():.3f} ± {auc.std(ddof=1):.3f}"
    assert by_name["i2r R@10"] == f"{(auc / 2).mean():.3f} ± {(auc / 2).std(ddof=1):.3f}"
    # a metric one seed lacks is averaged over the seeds that have it
    assert by_name["seg Dice 1%"] == f"{0.15:.3f} ± {np.std([0.1, 0.2], ddof=1):.3f}"
    assert by_name["pointing game"] == "n/a"
    assert dict(zip(names, [c.strip() for c in rows["d"].split("|")[1:-1]], strict=True))["zero-shot AUC (combined)"] == "0.800 ± 0.000"


def test_per_seed_table_has_one_line_per_run_in_seed_order(ablate):
    results = {"a": {2: fake_results(0.75, None), 0: fake_results(0.70, 0.10)}, "d": {1: fake_results(0.80, 0.30)}}
    lines = ablate.per_seed_table(results).splitlines()
    names = ["row", "seed", *ablate.METRICS]
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == names
    runs = [dict(zip(names, [c.strip() for c in line.split("|")[1:-1]], strict=True)) for line in lines[2:]]
    assert [(run["row"], run["seed"]) for run in runs] == [("a", "0"), ("a", "2"), ("d", "1")]
    assert runs[0]["zero-shot AUC (combined)"] == "0.700" and runs[0]["seg Dice 1%"] == "0.100"
    assert runs[1]["seg Dice 1%"] == "n/a" and runs[2]["i2r R@10"] == "0.400"


def test_report_mode_tabulates_finished_runs_only(ablate, tmp_path, capsys):
    for row, seed, auc in (("a", 0, 0.6), ("a", 2, 0.8), ("d", 0, 0.9)):
        eval_dir = tmp_path / f"{row}_seed{seed}" / "eval"
        eval_dir.mkdir(parents=True)
        (eval_dir / "results.json").write_text(json.dumps(fake_results(auc, 0.1)))
    (tmp_path / "d_seed1").mkdir()  # a run that started but did not finish
    assert ablate.main(["--shards", str(tmp_path), "--out", str(tmp_path), "--report", "--rows", "a", "d"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["a"]["seeds"] == [0, 2] and summary["a"]["zero-shot AUC (combined)"] == [0.6, 0.8]
    assert summary["d"]["seeds"] == [0]
    report = (tmp_path / "results.md").read_text()
    assert "| a: global only (CLIP-style) | 0,2 | 0.700 ± 0.141 |" in report
    assert "| a | 2 | 0.800 |" in report and "| d | 0 | 0.900 |" in report


def test_a_failed_run_is_reported_and_the_others_are_tabulated(ablate, tmp_path, monkeypatch, capsys):
    import subprocess

    def fake_run_one(row, seed, args, port):
        if (row, seed) == ("d", 1):
            raise subprocess.CalledProcessError(1, ["pretrain.py"])
        return fake_results(0.5 + seed / 10, 0.1)

    monkeypatch.setattr(ablate, "run_one", fake_run_one)
    code = ablate.main(["--shards", str(tmp_path), "--out", str(tmp_path), "--rows", "a", "d", "--seeds", "0", "1",
                        "--parallel", "2"])
    assert code == 1
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["a"]["seeds"] == [0, 1] and summary["d"]["seeds"] == [0]
    assert "FAILED: row d seed 1" in capsys.readouterr().err


def test_set_overrides_reach_every_run_and_rows_keep_theirs(ablate, tmp_path, monkeypatch):
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        if "--out" in cmd:  # the evaluation writes the results the study reads back
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps(fake_results(0.7, 0.2)))

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    args = ablate.argparse.Namespace(out=tmp_path, config=tmp_path / "c.yaml", shards=tmp_path / "s", steps=5, batch=4,
                                     set=[["model.text.max_length", "128"], ["loss.integrity", "learned"]])
    assert ablate.run_one("c", 0, args, 29500) == fake_results(0.7, 0.2)
    train = commands[0]
    assert train[train.index("--model.text.max_length") + 1] == "128"
    # the row's own setting comes later on the command line, so it wins
    assert [train[i + 1] for i, a in enumerate(train) if a == "--loss.integrity"] == ["learned", "relative"]
