"""`run` with several OOD sets end to end (efficientnet_lite0 on ../shared/imagenet-sample + generated images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from oodcore.cli.main import main
from oodcore.store import cache
from tests.oodsets_fixtures import make_study

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def bench_of(out) -> str:
    """The multi-set run's benchmark (default names carry a hash of the resolved folders)."""
    return json.loads((out / "r.json").read_text())["benchmark"]


@pytest.fixture(scope="module")
def study(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sets")
    return out, make_study(shared_dir, out)


def _run(study, *extra, methods="msp,energy,odin"):
    out, st = study
    args = ["run", "--arch", "efficientnet_lite0", "--id-dir", str(st["val"]), "--cache-dir", str(out / "cache")]
    return main([*args, "--workers", "0", "--bootstrap", "0", "--methods", methods, *extra])


@pytest.fixture(scope="module")
def multi(study):
    """One run: ImageNet-O-shaped + two flat sets in group `far`; then the same run plus one more set."""
    import oodcore.extraction.pipeline as pipeline

    out, st = study
    calls = []
    real = pipeline.extract_split

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    sets = ["--ood-dir", str(st["imagenet_o"]), "--ood", f"textures={st['textures']}:far"]
    sets += ["--ood", f"inat={st['inat']}:far"]
    pipeline.extract_split = counting
    try:
        assert _run(study, *sets, "--json", str(out / "r.json"), "--scores-csv", str(out / "s.csv")) == 0
        first = list(calls)
        calls.clear()
        assert _run(study, *sets, "--ood", f"extra={st['extra']}", "--json", str(out / "r2.json")) == 0
        second = list(calls)
    finally:
        pipeline.extract_split = real
    return out, st, first, second


def test_one_run_reports_per_set_and_group(multi, capsys):
    out, st, first, _ = multi
    assert first == [
        "efficientnet_lite0 id",
        "efficientnet_lite0 ood",
        "efficientnet_lite0 ood",
        "efficientnet_lite0 ood",
    ]
    report = json.loads((out / "r.json").read_text())
    assert [(s["name"], s["group"], s["n_ood"]) for s in report["sets"]] == [
        ("imagenet-o", None, 12),
        ("textures", "far", 3),
        ("inat", "far", 3),
    ]
    assert report["n_ood"] == 18 and report["results_scope"] == "all 3 OOD sets pooled"
    far = report["groups"][0]
    assert far["name"] == "far" and far["sets"] == ["textures", "inat"]
    msp = [s["results"][0] for s in report["sets"]]
    assert far["results"][0]["auroc"] == pytest.approx((msp[1]["auroc"] + msp[2]["auroc"]) / 2)
    assert report["overall"]["results"][0]["auroc"] == pytest.approx(sum(m["auroc"] for m in msp) / 3)
    frame = pd.read_csv(out / "s.csv", keep_default_na=False)
    assert frame["ood_set"].value_counts().to_dict() == {"imagenet-o": 12, "": 10, "textures": 3, "inat": 3}
    ood = frame[frame["is_ood"] == 1]
    assert all(p.startswith(f"{s}/") for p, s in zip(ood["path"], ood["ood_set"]))  # unique across sets
    run = cache.read_run(out / "cache", bench_of(out), "efficientnet_lite0")
    assert [s["name"] for s in run["ood_sets"]] == ["imagenet-o", "textures", "inat", "extra"]  # after the 2nd run


def test_adding_a_set_later_extracts_only_that_set(multi):
    out, _, _, second = multi
    assert second == ["efficientnet_lite0 ood"]
    report = json.loads((out / "r2.json").read_text())
    assert [s["name"] for s in report["sets"]] == ["imagenet-o", "textures", "inat", "extra"]
    first = json.loads((out / "r.json").read_text())
    assert report["sets"][0]["results"] == first["sets"][0]["results"]  # the same cached rows


def test_cli_table_lists_sets_and_group_means(study, capsys):
    out, st = study
    sets = ["--ood-dir", str(st["imagenet_o"]), "--ood", f"textures={st['textures']}:far"]
    rc = _run(study, *sets, "--name", "table", methods="msp")
    assert rc == 0
    text = capsys.readouterr().out
    assert "imagenet-o" in text and "textures" in text and "far mean" in text and "overall mean" in text


def test_ninco_clean_subset_keeps_exactly_the_listed_files(study, capsys):
    out, st = study
    rc = _run(study, "--ood-dir", str(st["imagenet_o"]), "--ood-subset", "ninco-clean", "--json", str(out / "c.json"))
    assert rc == 0
    assert "--ood-subset ninco-clean: found 4 of the 309 listed files" in capsys.readouterr().err
    report = json.loads((out / "c.json").read_text())
    data = cache.load_benchmark(out / "cache", report["benchmark"], "efficientnet_lite0")
    assert sorted(data.ood.paths) == sorted(st["clean"])


def test_tune_set_moves_odin_and_the_report_says_so(study):
    out, st = study
    base = ["--ood-dir", str(st["imagenet_o"]), "--ood", f"textures={st['textures']}:far", "--name", "tuned"]
    assert _run(study, *base, "--json", str(out / "e.json"), methods="odin") == 0
    assert _run(study, *base, "--tune-ood", f"val={st['tune']}", "--json", str(out / "t.json"), methods="odin") == 0
    plain, tuned = (json.loads((out / f).read_text()) for f in ("e.json", "t.json"))
    for rep, tag in ((plain, "ood-exposure-0.5-seed0"), (tuned, "tune-set:val")):
        rows = [r for s in rep["sets"] for r in s["results"] if r["tuned_on"]] + [
            r for r in rep["results"] if r["tuned_on"]
        ]
        assert rows and all(r["tuned_on"] == tag for r in rows)
    # with the tuning set every test image is scored, the tuning images never
    assert [r["n_ood_scored"] for r in tuned["results"]] == [tuned["n_ood"]] * 2
    assert (
        tuned["n_ood"] == plain["n_ood"] and tuned["results"][1]["n_ood_scored"] > plain["results"][1]["n_ood_scored"]
    )


def test_misfires_badge_and_leaderboard_per_set(multi, monkeypatch):
    out, st, _, _ = multi
    monkeypatch.setenv("OODCORE_CACHE", str(out / "cache"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.sidebar.selectbox(key="bench").set_value(bench_of(out)).run()
    assert at.sidebar.selectbox(key="ood").options == [
        "all OOD sets",
        "far (group)",
        "imagenet-o · 12 images",
        "textures · 3 images",
        "inat · 3 images",
        "extra · 2 images",
    ]
    at.sidebar.selectbox(key="ood").set_value("set:imagenet-o").run()
    at.switch_page("pages/misfires.py").run()
    assert at.sidebar.selectbox(key="ood").value == "set:imagenet-o"
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "NINCO: contains an ImageNet object" in text  # the badge
    assert "2 of these top 12 misfires contain an ImageNet-1K object" in text
    at.switch_page("pages/leaderboard.py").run()
    assert not at.exception
    at.sidebar.selectbox(key="ood").set_value("group:far").run()
    at2 = at
    assert not at2.exception
    assert "unweighted mean over 2 OOD sets" in " ".join(i.value for i in at2.info)
    assert any(h.value == "Per OOD set" for h in at2.subheader)


def test_odin_grid_per_set_and_on_the_tuning_set(study):
    """The ODIN grid is cached per set (and for the tuning set) and read back in the run's row order."""
    from oodcore.data.oodsets import OodSetArg
    from oodcore.evaluation.report import evaluate_run
    from oodcore.extraction.runner import RunOptions, run_study

    out, st = study
    opts = RunOptions(
        arch="efficientnet_lite0",
        id_dir=str(st["val"]),
        ood_dir=str(st["imagenet_o"]),
        ood_sets=[OodSetArg("textures", str(st["textures"]), "far")],
        tune_ood=OodSetArg("val", str(st["tune"])),
        name="grid",
        workers=0,
        odin_grid=True,
        temps=(1.0, 100.0),
        limit=4,
        eps=(0.0, 0.002),
    )
    run_study(opts, out / "cache")
    data = cache.load_benchmark(out / "cache", "grid", "efficientnet_lite0")
    assert data.odin.ood.shape == (len(data.ood), 2, 2) and data.odin.tune.shape == (len(data.tune), 2, 2)
    # eps = 0 in the grid equals ODIN from the cached logits, row for row, in every set and the tuning set
    from oodcore import detectors as M

    odin = M.get("odin")
    for rows, grid in ((data.ood, data.odin.ood), (data.tune, data.odin.tune)):
        np.testing.assert_allclose(grid[:, 1, 0], odin.score(data, rows, T=100.0, eps=0.0), rtol=1e-4, atol=1e-6)
    tuned = [r for r in evaluate_run(data, ["odin"], n_boot=0)["results"] if r["tuned_on"]]
    assert tuned[0]["tuned_on"] == "tune-set:val" and tuned[0]["params"]["eps"] in (0.0, 0.002)
