"""The command line as a user meets it: demo table, JSON/CSV outputs, clear errors."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from oodcore import detectors as M
from oodcore.cli.main import main
from oodcore.evaluation.metrics import compute_metrics
from oodcore.store import cache

FIELDS = {"benchmark", "arch", "protocol", "n_id", "n_ood", "n_classes", "id_top1", "skipped", "results"}
ROW_FIELDS = {"method", "params", "auroc", "aupr_out", "aupr_in", "fpr95", "fpr95_in", "ci", "tuned_on"}


def test_demo_prints_table_and_writes_json_and_csv(demo_cache, tmp_path, capsys):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "s.csv"
    assert (
        main(
            [
                "demo",
                "--cache-dir",
                str(demo_cache),
                "--json",
                str(out_json),
                "--scores-csv",
                str(out_csv),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for name in ("msp", "maxlogit", "energy", "odin"):
        assert f"\n{name}" in printed
    assert "FPR95(OOD+)" in printed and "FPR95(ID+)" in printed and "held-out" in printed
    report = json.loads(out_json.read_text())
    assert FIELDS <= set(report) and report["benchmark"] == "demo" and report["n_classes"] == 5
    assert 0.5 < report["id_top1"] <= 1
    rows = report["results"]
    assert {r["method"] for r in rows} >= {"msp", "maxlogit", "energy", "odin"}
    data = cache.load_benchmark(demo_cache, "demo", "digits_cnn")
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("auroc", "aupr_out", "aupr_in", "fpr95", "fpr95_in"))
        if row["tuned_on"] is None:
            expected = compute_metrics(*M.get(row["method"]).score_id_ood(data, **row["params"]))
            assert row["auroc"] == pytest.approx(expected["auroc"])
            assert row["n_ood_scored"] == report["n_ood"]
        else:  # tuned rows are scored on the held-out half only
            assert row["n_ood_scored"] == report["split"]["n_heldout"] < report["n_ood"]
            assert "held-out" in row["note"]
        lo, hi = row["ci"]["auroc"]
        assert lo <= row["auroc"] <= hi
    frame = pd.read_csv(out_csv)
    assert list(frame.columns[:4]) == ["path", "is_ood", "label", "pred"]
    assert {"msp", "maxlogit", "energy", "odin"} <= set(frame.columns)
    assert len(frame) == report["n_id"] + report["n_ood"] and frame["is_ood"].sum() == report["n_ood"]


def test_list_shows_cached_runs(demo_cache, capsys):
    assert main(["list", "--cache-dir", str(demo_cache)]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "digits_cnn" in out and "odin-grid" in out


def test_cache_dir_from_environment(demo_cache, monkeypatch, capsys):
    monkeypatch.setenv("OODCORE_CACHE", str(demo_cache))
    assert main(["list"]) == 0
    assert "digits_cnn" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--arch", "efficientnet_lite0", "--id-dir", "/nonexistent/id", "--ood-dir", "/tmp"], "does not exist"),
        (
            ["run", "--arch", "efficientnet_lite0", "--id-dir", "/tmp", "--ood-dir", "/tmp", "--batch-size", "0"],
            "at least 1",
        ),
        (["demo", "--methods", "msp,bogus"], "unknown method"),
    ],
)
def test_bad_arguments_give_one_clear_line(argv, message, demo_cache, capsys):
    assert main(argv + ["--cache-dir", str(demo_cache)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.subprocess
def test_help_for_every_command():
    for command in ("demo", "run", "list", "methods", "bench"):
        result = subprocess.run([sys.executable, "-m", "oodcore", command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout, command
