"""The study at scale: many architectures per command, the official ID set, stored reports, torchrun.

A generated ImageNet root (`val/`, `train/`) and an ImageNet-O-shaped folder; timm's tiny
`test_resnet` / `test_efficientnet` with seeded random weights keep every run to seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodcore.cli.main import main
from oodcore.data.imagenet import imagenet_wnids
from oodcore.data.splits import find_train_root, sample_train
from oodcore.evaluation import stored
from oodcore.store import cache

N_VAL, N_TRAIN, N_CLASSES = 3, 4, 4
ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _image(path: Path, shade: int, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((40, 56, 3)) * 80 + shade).clip(0, 255).astype(np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """<tmp>/imagenet/{val,train}/<wnid>/ for 4 ImageNet-O classes (+2 other val classes), <tmp>/imagenet-o/."""
    tmp = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(0)
    wnids = imagenet_wnids()
    o_wnids, others = wnids[1:200:2], wnids[0:6:2]
    for j, w in enumerate(o_wnids[:N_CLASSES]):
        for i in range(N_VAL):
            _image(tmp / "imagenet" / "val" / w / f"v{i}.JPEG", 40 * j, rng)
        for i in range(N_TRAIN):
            _image(tmp / "imagenet" / "train" / w / f"t{i}.JPEG", 40 * j + 10, rng)
        for i in range(2):
            _image(tmp / "imagenet-o" / w / f"o{i}.JPEG", 150 + 30 * i, rng)
    for w in others[:2]:
        _image(tmp / "imagenet" / "val" / w / "v0.JPEG", 200, rng)
    for w in o_wnids[N_CLASSES:]:
        (tmp / "imagenet-o" / w).mkdir(parents=True, exist_ok=True)
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "test_resnet.safetensors"))
    return tmp


def _args(layout: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--id-dir",
        str(layout / "imagenet"),
        "--ood-dir",
        str(layout / "imagenet-o"),
        "--cache-dir",
        str(cache_dir),
        "--workers",
        "0",
        "--bootstrap",
        "20",
        *extra,
    ]


# --------------------------------------------------------------------------- fit images from train/


def test_train_sample_is_seeded_per_class_and_restricted_to_the_mask(tmp_path):
    rng = np.random.default_rng(1)
    wnids = imagenet_wnids()[:3]
    for w in wnids:
        for i in range(6):
            _image(tmp_path / "train" / w / f"{i}.JPEG", 10, rng)
    (tmp_path / "train" / wnids[0] / "notes.txt").write_text("not an image")
    (tmp_path / "val").mkdir()
    root = find_train_root(tmp_path, tmp_path / "val")
    assert root == (tmp_path / "train").resolve()
    assert find_train_root(tmp_path / "val", tmp_path / "val") == root  # the val folder given directly
    entries, labels = sample_train(root, wnids[:2], per_class=4)
    assert len(entries) == 8 and labels.tolist() == [0] * 4 + [1] * 4
    assert all(e.relpath.endswith(".JPEG") and e.wnid in wnids[:2] for e in entries)
    again, _ = sample_train(root, wnids[:2], per_class=4)
    assert again == entries
    # a class's sample does not depend on the other masked classes
    alone, _ = sample_train(root, [wnids[1]], per_class=4)
    assert alone == entries[4:]
    assert len(sample_train(root, wnids[:2], per_class=99)[0]) == 12
    assert find_train_root(tmp_path / "nowhere", tmp_path / "nowhere") is None


@pytest.mark.slow
def test_official_id_set_with_train_and_the_labelled_fallback(layout, tmp_path, capsys):
    weights = str(layout / "test_resnet.safetensors")
    out = tmp_path / "r.json"
    assert main(_args(layout, tmp_path / "c", "--arch", "test_resnet", "--weights", weights, "--json", str(out))) == 0
    report = json.loads(out.read_text())
    assert report["n_id"] == N_CLASSES * N_VAL  # every val image of the masked classes is evaluated
    assert report["official_id_set"] is True
    assert report["fit_source"]["kind"] == "train" and report["fit_source"]["per_class"] == 10
    assert "train" in report["fit_split"] and "official ID set" in report["fit_split"]
    data = cache.load_benchmark(tmp_path / "c", report["benchmark"], "test_resnet")
    assert len(data.fit) == N_CLASSES * N_TRAIN and set(data.fit.paths.tolist()) <= {
        f"{w}/t{i}.JPEG" for w in data.class_ids for i in range(N_TRAIN)
    }
    assert (
        main(_args(layout, tmp_path / "c", "--arch", "test_resnet", "--weights", weights, "--fit-per-class", "2")) == 0
    )
    assert len(cache.load_benchmark(tmp_path / "c", report["benchmark"], "test_resnet").fit) == N_CLASSES * 2

    # no train/: the held-out val fraction, and the report says the ID set is smaller than the official one
    val_only = tmp_path / "val"
    shutil.copytree(layout / "imagenet" / "val", val_only)
    args = _args(layout, tmp_path / "c2", "--arch", "test_resnet", "--weights", weights, "--json", str(out))
    args[args.index("--id-dir") + 1] = str(val_only)
    assert main(args) == 0
    small = json.loads(out.read_text())
    assert small["official_id_set"] is False and small["fit_source"]["kind"] == "id-holdout"
    assert small["n_id"] < N_CLASSES * N_VAL and "smaller than the official ID set" in small["fit_split"]
    assert "smaller than the official ID set" in capsys.readouterr().out


# --------------------------------------------------------------------------- many architectures, stored reports


@pytest.mark.slow
def test_many_architectures_one_table_and_stored_reports(layout, tmp_path, capsys, monkeypatch):
    archs = tmp_path / "archs.txt"
    archs.write_text("# the study\ntest_resnet\ntest_efficientnet  # second\n")
    out = tmp_path / "study.json"
    args = _args(layout, tmp_path / "c", "--arch-file", str(archs), "--weights", "random", "--json", str(out))
    assert main(args + ["--scores-csv", str(tmp_path / "s.csv")]) == 0
    text = capsys.readouterr()
    assert "[1/2] test_resnet" in text.err and "[2/2] test_efficientnet" in text.err
    assert "AUROC (%" in text.out and "FPR95(OOD+) (%" in text.out
    assert "not scored on" not in text.out  # the fit split from train/ serves every fitted detector
    study = json.loads(out.read_text())
    assert study["archs"] == ["test_resnet", "test_efficientnet"]
    assert {r["arch"] for r in study["table"]} == {"test_resnet", "test_efficientnet"}
    methods = {r["method"] for r in study["table"] if r["arch"] == "test_resnet"}
    assert {"msp", "energy", "mahalanobis", "knn", "odin *"} <= methods
    for report in study["reports"]:
        folder = cache.arch_dir(tmp_path / "c", report["benchmark"], report["arch"])
        assert (folder / stored.REPORT_FILE).is_file()
        assert stored.read_stored(tmp_path / "c", report["benchmark"], report["arch"], 20) == report
    import pandas as pd

    frame = pd.read_csv(tmp_path / "s.csv")
    assert set(frame["arch"]) == {"test_resnet", "test_efficientnet"} and "msp" in frame

    # the same command again: every split is served from the cache and no report is recomputed
    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr("oodcore.extraction.pipeline.extract_split", boom)
    monkeypatch.setattr(stored, "full_report", boom)
    assert main(args) == 0
    assert json.loads(out.read_text()) == study
    assert main(args[:-2] + ["--arch", "test_resnet,test_efficientnet", "--arch-file", str(archs)]) == 0


def test_arch_arguments_are_validated(tmp_path, capsys):
    base = ["run", "--id-dir", str(tmp_path), "--ood-dir", str(tmp_path)]
    assert main(base) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(base + ["--arch-file", str(tmp_path / "missing.txt")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(base + ["--arch", "a", "--chunk-size", "0"]) == 2


def test_a_demo_build_ends_with_its_report_stored(demo_cache, tmp_path, monkeypatch):
    """The leaderboard's first view of a freshly built demo reads the report instead of scoring every method."""
    from oodcore.extraction import demo

    root = tmp_path / "c"
    shutil.copytree(demo_cache, root)
    (cache.arch_dir(root, "demo", "digits_cnn") / stored.REPORT_FILE).unlink(missing_ok=True)
    assert stored.read_stored(root, "demo", "digits_cnn", n_boot=200) is None
    monkeypatch.setattr(demo, "is_built", lambda root: False)  # rebuild: every intact artifact is reused
    said = []
    demo.build_demo(root, progress=lambda message, fraction: said.append((message, fraction)))
    assert said[-1] == ("scoring every detector", 1.0)
    report = stored.read_stored(root, "demo", "digits_cnn", n_boot=200)  # the leaderboard's bootstrap setting
    assert report is not None and {r["method"] for r in report["results"]} >= {"msp", "knn", "vim", "ash_p"}


def test_stored_report_is_reused_and_only_trained_rows_are_added(demo_cache, tmp_path, monkeypatch):
    root = tmp_path / "c"
    shutil.copytree(demo_cache, root)
    report, computed = stored.stored_report(root, "demo", "digits_cnn", n_boot=0)
    assert computed and {r["method"] for r in report["results"]} >= {"msp", "knn", "vim"}
    again, computed = stored.stored_report(root, "demo", "digits_cnn", n_boot=0)
    assert not computed and again == json.loads(json.dumps(report))
    assert stored.read_stored(root, "demo", "digits_cnn", n_boot=10) is None  # other bootstrap settings: not current

    data = cache.load_benchmark(root, "demo", "digits_cnn")
    folder = cache.arch_dir(root, "demo", "digits_cnn")
    rng = np.random.default_rng(0)
    cache.save_trained(folder, "energy_ft", rng.random(len(data.id)), rng.random(len(data.ood)), {"label": "x"})
    assert stored.read_stored(root, "demo", "digits_cnn", n_boot=0) is None  # a new trained detector: stale
    scored = []
    from oodcore.evaluation import report as R

    real = R.evaluate_run

    def counting(data, names=None, **kw):
        scored.extend(names)
        return real(data, names, **kw)

    monkeypatch.setattr(R, "evaluate_run", counting)
    updated, computed = stored.stored_report(root, "demo", "digits_cnn", n_boot=0)
    assert computed and scored == ["energy_ft"]  # the registry methods' rows were kept
    assert [r for r in updated["results"] if r["method"] != "energy_ft"] == again["results"]
    assert any(r["method"] == "energy_ft" for r in updated["results"])


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.subprocess
def test_torchrun_two_cpu_processes_match_one_process(layout, tmp_path):
    """Chunks of 3 images shard every split (and the ODIN grid) over 2 gloo ranks; the cache and the report
    are byte-identical to one process with the same intra-op thread count (torchrun's default is 1)."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    repo = ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # cwd = the checkout, so `-m oodcore` imports this one
    common = _args(
        layout, tmp_path / "x", "--arch", "test_resnet", "--weights", str(layout / "test_resnet.safetensors")
    )
    common += ["--batch-size", "2", "--chunk-size", "3", "--odin-grid"]

    def run(prefix: list[str], name: str) -> Path:
        args = list(common)
        args[args.index("--cache-dir") + 1] = str(tmp_path / name)
        proc = subprocess.run(
            prefix + args + ["--json", str(tmp_path / f"{name}.json")],
            env=env,
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tmp_path / name

    one = run([sys.executable, "-m", "oodcore"], "one")
    two = run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "oodcore"], "two")
    assert "(rank 1/2)" not in (tmp_path / "two.json").read_text()
    names = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert any("odin_id-" in n for n in names) and not any("/parts/" in n for n in names)
    for name in names:
        if name.endswith(".npz"):
            with np.load(one / name, allow_pickle=False) as a, np.load(two / name, allow_pickle=False) as b:
                assert a.files == b.files
                for k in a.files:
                    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (name, k)
        elif name.endswith("report.json"):
            assert (one / name).read_bytes() == (two / name).read_bytes()
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    run_one, run_two = (json.loads(next(p.rglob("run.json")).read_text()) for p in (one, two))
    assert {k: v for k, v in run_one.items() if k != "seconds"} == {k: v for k, v in run_two.items() if k != "seconds"}


# --------------------------------------------------------------------------- the synthetic study


@pytest.mark.slow
def test_synthetic_study_is_a_real_cache_and_the_leaderboard_reads_stored_reports(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from oodcore.cli import bench_study
    from oodcore.evaluation.metrics import compute_metrics

    root = tmp_path / "study"
    archs = bench_study.build_study(root, archs=2, n_id=300, n_ood=60, n_fit=300, dim=256, k=20, say=lambda m: None)
    assert archs == ["synthetic_00", "synthetic_01"]
    for arch in archs:
        data = cache.load_benchmark(root, bench_study.BENCHMARK, arch)
        assert len(data.id) == 300 and len(data.ood) == 60 and len(data.fit) == 300
        assert (data.id.features >= 0).all()
        np.testing.assert_allclose(
            data.id.logits, data.id.features @ data.head_weight.T + data.head_bias, rtol=1e-4, atol=1e-4
        )
        _, thumb_offsets = cache.load_thumbnails(root, bench_study.BENCHMARK, arch, "ood")
        assert len(thumb_offsets) == 61
    from oodcore import detectors as M

    best = cache.load_benchmark(root, bench_study.BENCHMARK, "synthetic_00")
    s_id, s_ood = M.get("msp").score_id_ood(best)
    assert compute_metrics(s_id, s_ood)["auroc"] > 0.7  # the well-separated architecture separates
    figures = bench_study.build_reports(root, archs, n_boot=200)  # the leaderboard's setting
    assert set(figures["report_seconds_per_arch"]) == set(archs)
    fitted = cache.arch_dir(root, bench_study.BENCHMARK, "synthetic_00") / "fitted"
    assert list(fitted.glob("knn.table-id-*.arrays")) and list(fitted.glob("vim-*.npz"))  # stored with the report

    def boom(*a, **k):
        raise AssertionError("the leaderboard recomputed a stored report")

    monkeypatch.setattr(stored, "full_report", boom)
    monkeypatch.setenv("OODCORE_CACHE", str(root))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert not [w.value for w in at.warning if "Could not score" in str(w.value)]
    shown = " ".join(str(df.value) for df in at.dataframe)
    assert "synthetic_00" in shown and "synthetic_01" in shown


@pytest.mark.slow
@pytest.mark.subprocess
def test_fit_peak_rss_is_measured_in_a_fresh_process(tmp_path):
    from oodcore.cli import bench_study

    out = bench_study.fit_memory(tmp_path, [2000], dim=64, say=lambda m: None)
    for method in bench_study.FIT_METHODS:
        figure = out["2000"][method]
        assert figure["peak_rss_mb"] >= figure["peak_private_mb"] >= figure["private_before_fit_mb"] > 0, figure
        assert figure["query_rows"] == 1000 and figure["score_seconds"] >= 0, figure
    skipped = bench_study.fit_memory(tmp_path, [10**12], dim=2048, say=lambda m: None)
    assert "not attempted" in skipped[str(10**12)]["skipped"]
