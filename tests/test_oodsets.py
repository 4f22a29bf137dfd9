"""Several OOD sets per benchmark (issue #12): parsing, folders, NINCO subsets, OpenOOD layout, views, reports."""

from __future__ import annotations

import numpy as np
import pytest

from oodcore import detectors as M
from oodcore.data.folders import DatasetError
from oodcore.data.oodsets import (
    OodSetArg,
    keep_listed,
    ninco_annotations,
    ninco_subset,
    openood_sets,
    parse_ood_arg,
    scan_flat_folder,
)
from oodcore.data.studysets import resolve_study
from oodcore.evaluation.metrics import compute_metrics
from oodcore.evaluation.report import evaluate_run, scores_frame
from oodcore.evaluation.sets import evaluate_scope, evaluate_sets, mean_rows
from oodcore.store import scopes
from oodcore.store.rundata import OdinGrid, OodSet, SplitArrays
from tests.helpers import make_data
from tests.oodsets_fixtures import noise_image


def test_parse_ood_arg(tmp_path):
    assert parse_ood_arg("ninco=/data/ninco:near") == OodSetArg("ninco", "/data/ninco", "near")
    assert parse_ood_arg("tex=/data/textures") == OodSetArg("tex", "/data/textures", None)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_ood_arg(f"x={odd}").path == str(odd)  # an existing path with a colon stays whole
    for bad in ("nopath", "=/x", "bad name=/x"):
        with pytest.raises(DatasetError):
            parse_ood_arg(bad)


def test_ninco_subsets_are_the_annotation_counts():
    table = ninco_annotations()
    assert len(table) == 400
    assert len(ninco_subset("ninco-clean")) == 309
    assert len(ninco_subset("ninco-contaminated")) == 78
    assert all("/" in k and k.split("/")[0].startswith("n") for k in table)
    with pytest.raises(DatasetError, match="unknown --ood-subset"):
        ninco_subset("clean")


def test_ninco_ships_as_package_data_with_its_licence():
    from importlib import resources

    folder = resources.files("oodcore.data").joinpath("ninco")
    assert "MIT License" in folder.joinpath("LICENSE").read_text()
    assert "NINCO" in folder.joinpath("PROVENANCE").read_text()


def test_flat_folder_and_image_list(tmp_path):
    for rel in ("a.jpg", "cat/b.jpg", "n12345678/c.jpg"):
        noise_image(tmp_path / "flat" / rel, 0, 8)
    (tmp_path / "flat" / "README.txt").write_text("x")
    root, entries, ignored = scan_flat_folder(tmp_path / "flat")
    assert [e.relpath for e in entries] == ["a.jpg", "cat/b.jpg", "n12345678/c.jpg"]
    assert [e.wnid for e in entries] == ["", "", "n12345678"]
    assert ignored == ["README.txt"]
    kept, note = keep_listed(entries, ["flat/cat/b.jpg", "flat/missing.jpg"], "flat")
    assert [e.relpath for e in kept] == ["cat/b.jpg"] and "kept 1 of 3" in note


def _study(tmp_path):
    """ImageNet-1K wnid folders of generated images: ID val, an ImageNet-O-shaped set, flat sets."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    for i, w in enumerate(wnids):
        noise_image(tmp_path / "val" / w / f"v{i}.JPEG", i, 8)
    noise_image(tmp_path / "val" / "n01491361" / "v9.JPEG", 9, 8)  # a class outside the ImageNet-O mask
    noise_image(tmp_path / "imo" / "n01443537" / "benthos_0.9994893.JPEG", 10, 8)  # NINCO: 'i'
    noise_image(tmp_path / "imo" / "n01443537" / "cardinal_tetra_Paracheirodon_axelrodi_0.99767953.JPEG", 11, 8)
    noise_image(tmp_path / "imo" / wnids[0] / "other.JPEG", 12, 8)
    noise_image(tmp_path / "imo" / wnids[2] / "x.JPEG", 13, 8)
    for j in range(3):
        noise_image(tmp_path / "tex" / f"c{j % 2}" / f"t{j}.jpg", 20 + j, 8)
        noise_image(tmp_path / "tune" / f"u{j}.jpg", 30 + j, 8)
    return tmp_path


def test_resolve_study_mask_from_imagenet_o_shaped_set(tmp_path):
    d = _study(tmp_path)
    sets = [OodSetArg("tex", str(d / "tex"), "far"), OodSetArg("imo", str(d / "imo"), "near")]
    spec, resolved, tune = resolve_study(str(d / "val"), sets, "imagenet-o", tune=OodSetArg("t", str(d / "tune")))
    assert spec.class_wnids == ["n01440764", "n01443537", "n01484850"]  # the ImageNet-O-shaped set's folders
    assert len(spec.id_files) == 3  # the ID class outside the mask is not scored
    assert [s.name for s in resolved] == ["tex", "imo"] and [len(s.files) for s in resolved] == [3, 4]
    assert [s.imagenet_shaped for s in resolved] == [False, True]
    assert len(tune.files) == 3
    # the mask does not depend on the flat sets: adding one leaves the ID files (and so their cache key) alone
    spec2, _, _ = resolve_study(str(d / "val"), sets[1:], "imagenet-o")
    assert spec2.class_wnids == spec.class_wnids and spec2.id_files == spec.id_files


def test_resolve_study_subset_and_errors(tmp_path):
    d = _study(tmp_path)
    sets = [OodSetArg("imo", str(d / "imo")), OodSetArg("tex", str(d / "tex"))]
    spec, resolved, _ = resolve_study(str(d / "val"), sets, "imagenet-o", subsets={None: "ninco-contaminated"})
    assert [e.relpath for e in resolved[0].files] == ["n01443537/benthos_0.9994893.JPEG"]
    assert len(resolved[1].files) == 3  # a flat set is not filtered by a subset for every ImageNet-O-shaped set
    assert any("found 1 of the 78 listed files" in n for n in spec.notes)
    spec, resolved, _ = resolve_study(str(d / "val"), sets, "imagenet-o", subsets={"imo": "ninco-clean"})
    assert [e.relpath for e in resolved[0].files] == ["n01443537/cardinal_tetra_Paracheirodon_axelrodi_0.99767953.JPEG"]
    with pytest.raises(DatasetError, match="ImageNet-O-shaped"):
        resolve_study(str(d / "val"), [OodSetArg("tex", str(d / "tex"))], "imagenet-o")
    with pytest.raises(DatasetError, match="unique"):
        resolve_study(str(d / "val"), [sets[0], sets[0]], "imagenet-o")
    with pytest.raises(DatasetError, match="disjoint"):
        resolve_study(str(d / "val"), sets, "imagenet-o", tune=OodSetArg("t", str(d / "tex")))
    with pytest.raises(DatasetError, match="no wnid folders"):
        resolve_study(str(d / "val"), sets, "imagenet-o", subsets={"tex": "ninco-clean"})
    spec, resolved, _ = resolve_study(str(d / "val"), [OodSetArg("tex", str(d / "tex"))], "full")
    assert len(spec.class_wnids) == 1000 and len(resolved[0].files) == 3  # flat sets alone under `full`


def test_openood_layout(tmp_path):
    root = tmp_path / "data"
    lists = root / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    for sub in ("images_largescale/ssb_hard/n00000001", "images_largescale/openimage_o", "images_classic/texture/a"):
        noise_image(root / sub / "x.jpg", 0, 8)
    noise_image(root / "images_largescale/openimage_o/val.jpg", 1, 8)
    (lists / "test_openimage_o.txt").write_text("openimage_o/x.jpg -1\n")
    (lists / "val_openimage_o.txt").write_text("openimage_o/val.jpg -1\n")
    sets, tune, notes = openood_sets(root)
    assert [(s.name, s.group) for s in sets] == [("ssb_hard", "near"), ("textures", "far"), ("openimage_o", "far")]
    assert any("ninco" in n for n in notes) and any("inaturalist" in n for n in notes)
    assert tune.name == "openimage_o_val" and tune.imglist.endswith("val_openimage_o.txt")
    noise_image(tmp_path / "val" / "n01440764" / "v.JPEG", 0, 8)
    spec, resolved, t = resolve_study(str(tmp_path / "val"), sets, "full", tune=tune)
    assert [len(s.files) for s in resolved] == [1, 1, 1]  # the test list keeps x.jpg, not the val image
    assert [e.relpath for e in resolved[2].files] == ["x.jpg"] and [e.relpath for e in t.files] == ["val.jpg"]
    with pytest.raises(DatasetError, match="none of OpenOOD"):
        openood_sets(tmp_path / "val")


# ---- views, reports ----


def _multi(rng, tune: bool = False):
    k = 4
    logits_id = rng.normal(0, 1, (40, k)) + 3 * np.eye(k)[rng.integers(0, k, 40)]
    logits_ood = np.concatenate([rng.normal(0, 1, (12, k)), rng.normal(0, 1, (8, k)) * 0.5, rng.normal(0, 1, (6, k))])
    extra = {}
    if tune:
        logits_tune = rng.normal(0, 1, (10, k))
        extra = {
            "tune": SplitArrays(logits_tune, None, np.full(10, -1), np.asarray([f"t/{i}" for i in range(10)])),
            "tune_name": "val",
        }
    data = make_data(logits_id, logits_ood, **extra)
    data.ood_sets = [OodSet("a", "near", 0, 12), OodSet("b", "far", 12, 20), OodSet("c", "far", 20, 26)]
    return data


def test_scopes_and_select_keep_rows_and_grid_in_step():
    rng = np.random.default_rng(0)
    data = _multi(rng)
    temps, eps = np.array([1.0, 10.0]), np.array([0.0, 0.001])
    data.odin = OdinGrid(temps, eps, rng.normal(size=(40, 2, 2)), rng.normal(size=(26, 2, 2)))
    assert scopes.scopes(data) == ["all", "group:near", "group:far", "set:a", "set:b", "set:c"]
    far = scopes.select(data, "group:far")
    assert len(far.ood) == 14 and [(s.name, s.start, s.stop) for s in far.ood_sets] == [("b", 0, 8), ("c", 8, 14)]
    np.testing.assert_array_equal(far.ood.logits, data.ood.logits[12:26])
    np.testing.assert_array_equal(far.ood.precomputed["odin"].values, data.odin.ood[12:26])
    assert far.states is data.states  # fitted once per run, whatever the scope
    s_id, s_ood = M.get("msp").score_id_ood(far)
    full_id, full_ood = M.get("msp").score_id_ood(data)
    np.testing.assert_allclose(s_ood, full_ood[12:26])
    # the exposure split of a view is the full run's, restricted
    full, view = data.tuning_split(), far.tuning_split()
    np.testing.assert_array_equal(12 + view.exposure, full.exposure[full.exposure >= 12])
    np.testing.assert_array_equal(12 + view.heldout, full.heldout[full.heldout >= 12])
    assert scopes.select(data, "all") is data
    with pytest.raises(ValueError, match="no OOD set 'zzz'"):
        scopes.select(data, "set:zzz")


def test_sets_report_group_means_are_unweighted_means_of_the_sets():
    data = _multi(np.random.default_rng(1))
    report = evaluate_sets(data, ["msp", "energy"], n_boot=0)
    assert [s["name"] for s in report["sets"]] == ["a", "b", "c"] and [s["n_ood"] for s in report["sets"]] == [12, 8, 6]
    s_id, s_ood = M.get("msp").score_id_ood(data)
    per_set = [compute_metrics(s_id, s_ood[a:b])["auroc"] for a, b in ((0, 12), (12, 20), (20, 26))]
    assert [s["results"][0]["auroc"] for s in report["sets"]] == pytest.approx(per_set)
    far = next(g for g in report["groups"] if g["name"] == "far")
    assert far["sets"] == ["b", "c"] and far["results"][0]["auroc"] == pytest.approx(np.mean(per_set[1:]))
    assert report["overall"]["results"][0]["auroc"] == pytest.approx(np.mean(per_set))
    assert report["results"][0]["auroc"] == pytest.approx(compute_metrics(s_id, s_ood)["auroc"])  # pooled
    scoped = evaluate_scope(data, "group:far", ["msp"], n_boot=0)
    assert scoped["results"][0]["auroc"] == pytest.approx(np.mean(per_set[1:]))
    assert evaluate_scope(data, "set:b", ["msp"], n_boot=0)["results"][0]["auroc"] == pytest.approx(per_set[1])
    frame = scores_frame(data, ["msp"])
    assert list(frame["ood_set"]) == [""] * 40 + ["a"] * 12 + ["b"] * 8 + ["c"] * 6


def test_mean_rows_keep_per_set_settings():
    def rows(p, v):
        return {
            "results": [
                {
                    "method": "odin",
                    "params": p,
                    "auroc": v,
                    "aupr_out": v,
                    "aupr_in": v,
                    "fpr95": v,
                    "fpr95_in": v,
                    "n_ood_scored": 3,
                    "tuned_on": "x",
                    "note": "n",
                }
            ]
        }

    out = mean_rows([{"name": "a", **rows({"T": 1.0}, 0.5)}, {"name": "b", **rows({"T": 10.0}, 1.0)}])
    assert (
        out[0]["auroc"] == 0.75
        and out[0]["params"] == {}
        and out[0]["params_per_set"] == {"a": {"T": 1.0}, "b": {"T": 10.0}}
    )


def test_tune_set_moves_odin_tuning_and_every_test_row_is_scored():
    rng = np.random.default_rng(2)
    plain, tuned = _multi(rng), _multi(np.random.default_rng(2), tune=True)
    r0 = evaluate_run(plain, ["odin"], n_boot=0)
    r1 = evaluate_run(tuned, ["odin"], n_boot=0)
    t0, t1 = r0["results"][1], r1["results"][1]
    assert t0["tuned_on"].startswith("ood-exposure") and t0["n_ood_scored"] < 26
    assert t1["tuned_on"] == "tune-set:val" and t1["n_ood_scored"] == 26 and "'val'" in t1["note"]
    assert r1["split"]["tune_set"] == "val" and "tuning set" in r1["tuning_source"]
    # the tuned setting is the one with the best AUROC on (ID, tuning set)
    odin = M.get("odin")
    best = max(
        ({"T": T, "eps": 0.0} for T in [p["T"] for p in [t1["params"]]] + [1.0, 10.0, 100.0, 1000.0]),
        key=lambda p: compute_metrics(odin.score(tuned, tuned.id, **p), odin.score(tuned, tuned.tune, **p))["auroc"],
    )
    auc = lambda p: compute_metrics(odin.score(tuned, tuned.id, **p), odin.score(tuned, tuned.tune, **p))["auroc"]  # noqa: E731
    assert auc(t1["params"]) == pytest.approx(auc(best))
    assert t1["tune_auroc"] == pytest.approx(auc(t1["params"]))


def test_single_set_run_reads_as_before(demo_cache):
    """A run.json without `ood_sets` (the demo, any older cache) is one set; its report is unchanged."""
    from oodcore.store import cache

    data = cache.load_benchmark(demo_cache, "demo", "digits_cnn")
    assert len(data.ood_sets) == 1 and data.ood_sets[0].n == len(data.ood)
    assert scopes.scopes(data) == ["all"]
    names = ["msp", "odin"]
    plain, sets = evaluate_run(data, names, n_boot=0), evaluate_sets(data, names, n_boot=0)
    assert "sets" not in sets and sets["results"] == plain["results"]
    assert [r["tuned_on"] for r in plain["results"] if r["tuned_on"]] == ["ood-exposure-0.5-seed0"]


def test_export_names_each_rows_set(tmp_path):
    from oodcore.evaluation.export import export_run

    data = _multi(np.random.default_rng(3))
    npz, side = export_run(scopes.select(data, "group:far"), tmp_path / "x.npz")
    with np.load(npz, allow_pickle=False) as z:
        assert list(z["ood_set_ood"]) == ["b"] * 8 + ["c"] * 6 and z["logits_ood"].shape[0] == 14
    import json

    assert [s["name"] for s in json.loads(side.read_text())["ood_sets"]] == ["b", "c"]


@pytest.mark.slow
def test_energy_finetuning_uses_the_tuning_set_and_scores_every_test_row(demo_cache, tmp_path):
    """A run with a --tune-ood set: outlier exposure comes from it, and every test OOD row is scored."""
    import json
    import shutil

    from oodcore.store import cache
    from oodcore.store.atomic import write_npz
    from oodcore.training import config as train_config
    from oodcore.training import jobs

    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    folder = cache.arch_dir(root, "demo", "digits_cnn")
    run = json.loads((folder / "run.json").read_text())
    from oodcore.store.integrity import load_arrays

    z = load_arrays(folder / run["files"]["ood"])  # the store's one reader (.npy folders, memory-mapped)
    rng = np.random.default_rng(0)
    rows = {k: np.asarray(z[k][:60]) for k in ("logits", "features", "labels", "paths")}
    rows["features"] = rows["features"] + rng.normal(0, 0.1, rows["features"].shape).astype(np.float32)
    write_npz(folder / "tune-0123456789abcdef.npz", rows)  # a separate "tuning set" for the plumbing
    run["files"]["tune"] = "tune-0123456789abcdef.npz"
    run["tune_set"] = {"name": "val", "n": 60, "files_key": "tune"}
    (folder / "run.json").write_text(json.dumps(run))
    cfg = train_config.TrainConfig(kind="energy", benchmark="demo", input="features", epochs=1)
    status = jobs.run_job(root, cfg, n_boot=0)
    assert status["state"] == "done", status
    data = cache.load_benchmark(root, "demo", "digits_cnn")
    trained = data.trained[status["result"]["name"]]
    assert "tuning set 'val'" in trained.meta["trained_on"]["ood"] and "(60 rows)" in trained.meta["trained_on"]["ood"]
    row = evaluate_run(data, [status["result"]["name"]], n_boot=0)["results"][0]
    assert row["tuned_on"] == "tune-set:val" and row["n_ood_scored"] == len(data.ood)
    assert status["result"]["baseline"]["n_ood_scored"] == len(data.ood)
    with pytest.raises(Exception, match="tune-ood"):  # the demo's pixels have no tuning set
        jobs.run_job(root, train_config.TrainConfig(kind="energy", benchmark="demo", epochs=1), n_boot=0)
