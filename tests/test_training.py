"""Training runs: flows (exact inverse, log-determinants), energy fine-tuning, jobs (NaN guard, cancel,
resume, lock), the `train` command and the Training page. Small models and few epochs: CPU seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from oodcore import detectors as M
from oodcore.cli.main import main
from oodcore.data.splits import ood_split
from oodcore.evaluation.metrics import compute_metrics
from oodcore.store import cache
from oodcore.training import config as train_config
from oodcore.training import files as job_files
from oodcore.training import flows as F
from oodcore.training import jobs, launch

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"method", "params", "auroc", "aupr_out", "aupr_in", "fpr95", "fpr95_in", "ci", "tuned_on"}
# a small flow on the demo's 64-d features: a second or two per run
SMALL_FLOW = dict(
    kind="flow", benchmark="demo", input="features", mask="halves", width=32, bottleneck=8, layers=4, epochs=3
)


@pytest.fixture
def cache_copy(demo_cache, tmp_path) -> Path:
    """A writable copy of the session's demo cache (the fixture itself must stay untouched)."""
    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial parameters (a fresh flow is the identity: its s/t output layers start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ------------------------------------------------------------------ flows


@pytest.mark.parametrize("mask", F.PIXEL_MASKS)
def test_pixel_couplings_invert_and_logdet_matches_jacobian(mask):
    shape = (1, 4, 4)
    flow = F.pixel_flow(mask, n_layers=4, width=6, bottleneck=3, shape=shape).double()
    randomise(flow)
    x = torch.randn(3, *shape, dtype=torch.float64)
    for layer in list(flow.layers) + [flow]:
        z, logdet = layer(x)
        assert torch.allclose(layer.inverse(z), x, atol=1e-5)
        for i in range(len(x)):
            jac = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, *shape))[0].flatten(), x[i].flatten())
            sign, logabs = torch.linalg.slogdet(jac)
            assert sign > 0 and torch.isclose(logabs, logdet[i], atol=1e-6), (mask, float(logabs), float(logdet[i]))


@pytest.mark.parametrize("mask", F.FEATURE_MASKS)
def test_embedding_couplings_invert_and_logdet_matches_jacobian(mask):
    flow = F.feature_flow(mask, dim=7, n_layers=4, width=8, bottleneck=3, seed=1).double()
    randomise(flow, seed=2)
    x = torch.randn(4, 7, dtype=torch.float64)
    for layer in list(flow.layers) + [flow]:
        z, logdet = layer(x)
        assert torch.allclose(layer.inverse(z), x, atol=1e-5)
        for i in range(len(x)):
            jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x[i])
            assert torch.isclose(torch.linalg.slogdet(jac)[1], logdet[i], atol=1e-6)


def test_masks_follow_the_papers():
    cyc = F.pixel_masks("cyclic", 4, (1, 4, 4))
    quads = [c for c, _ in cyc]
    for k, (cond, trans) in enumerate(cyc):
        assert cond.sum() == trans.sum() == 4 and not (cond * trans).any()
        assert torch.equal(trans, quads[(k + 1) % 4])  # transforms the next quadrant given this one
    assert torch.equal(sum(t for _, t in cyc), torch.ones(1, 4, 4))  # every pixel transformed once per cycle
    hor = F.pixel_masks("horizontal", 2, (1, 4, 4))
    assert hor[0][0][0, :2].all() and not hor[0][0][0, 2:].any() and torch.equal(hor[1][0], hor[0][1])
    chk = F.pixel_masks("checkerboard", 2, (1, 4, 4))
    assert chk[0][0][0, 0, 0] == 1 and chk[0][0][0, 0, 1] == 0 and torch.equal(chk[1][0], chk[0][1])
    rnd = F.feature_masks("random", 3, 10, seed=0)
    assert all(c.sum() == 5 and torch.equal(c + t, torch.ones(10)) for c, t in rnd)
    assert not torch.equal(rnd[0][0], rnd[1][0]) and torch.equal(
        rnd[0][0], F.feature_masks("random", 3, 10, seed=0)[0][0]
    )


def test_pixel_density_is_a_discrete_bits_per_dim():
    """The logit transform's log-determinant matches autograd; the NLL is per dimension over 256 levels."""
    x = torch.rand(1, 1, 3, 3, dtype=torch.float64) * 0.98 + 0.01
    _, ld = F.logit_transform(x)
    jac = torch.autograd.functional.jacobian(lambda v: F.logit_transform(v.view(1, 1, 3, 3))[0].flatten(), x.flatten())
    assert torch.isclose(torch.linalg.slogdet(jac)[1], ld[0], atol=1e-8)
    model = F.PixelDensity(F.pixel_flow("checkerboard", 2, 4, 2, shape=(1, 4, 4), input_norm=False)).double()
    pixels = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    bpd = model.nll_bpd(pixels)
    assert bpd.shape == (5,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    assert torch.equal(bpd, model.nll_bpd(pixels))  # evaluation uses the bin centre: deterministic
    assert not torch.equal(bpd, model.nll_bpd(pixels, torch.rand_like(pixels)))


# ------------------------------------------------------------------ energy fine-tuning


def test_energy_finetuning_beats_the_untuned_energy_on_held_out(cache_copy):
    status = jobs.run_job(cache_copy, train_config.TrainConfig(kind="energy", benchmark="demo", epochs=2), n_boot=0)
    assert status["state"] == "done"
    result = status["result"]
    data = cache.load_benchmark(cache_copy, "demo", "digits_cnn")
    split = ood_split(len(data.ood))
    untuned = compute_metrics(*(lambda s: (s[0], s[1][split.heldout]))(M.get("energy").score_id_ood(data)))
    assert result["baseline"]["method"] == "energy"
    assert result["baseline"]["auroc"] == pytest.approx(untuned["auroc"])
    assert result["auroc"] > untuned["auroc"] + 0.01, (result["auroc"], untuned["auroc"])
    # published: the report scores it on the held-out rows only, like every detector trained with OOD data
    assert "energy_ft" in data.trained and data.trained["energy_ft"].meta["label"].startswith("Energy FT (whole CNN")
    from oodcore.evaluation.report import evaluate_run

    row = evaluate_run(data, ["energy_ft"], n_boot=0)["results"][0]
    assert (
        row["n_ood_scored"] == len(split.heldout) and row["tuned_on"] and row["auroc"] == pytest.approx(result["auroc"])
    )
    meta = data.trained["energy_ft"].meta
    assert meta["m_in"] < meta["m_out"] and "exposure" in meta["split"] and meta["options"]["epochs"] == 2


def test_energy_head_starts_from_the_cached_head(cache_copy):
    """Epoch 0 of the head fine-tuning reproduces the untuned Energy exactly (same model, same rows)."""
    from oodcore.training.energy import build_energy_task

    data = cache.load_benchmark(cache_copy, "demo", "digits_cnn")
    cfg = train_config.resolve(train_config.TrainConfig(kind="energy", benchmark="demo", input="features"), data.meta)
    task = build_energy_task(cfg, data, cache_copy)
    with torch.no_grad():
        s_id, s_ood = task.score()
    e_id, e_ood = M.get("energy").score_id_ood(data)
    assert np.allclose(s_id, e_id, atol=1e-3) and np.allclose(s_ood, e_ood, atol=1e-3)


# ------------------------------------------------------------------ the job loop


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(cache_copy, monkeypatch):
    from oodcore.training import flow as train_flow

    real_loss, calls = train_flow.FlowTask.loss, {"n": 0}

    def loss_with_nan(self, batch):
        calls["n"] += 1
        total, a, b = real_loss(self, batch)
        if calls["n"] == self.n_batches() + 3:  # step 3 of epoch 2
            return total * float("nan"), a, b
        return total, a, b

    monkeypatch.setattr(train_flow.FlowTask, "loss", loss_with_nan)
    status = jobs.run_job(cache_copy, train_config.TrainConfig(**SMALL_FLOW), n_boot=0)
    assert status["state"] == "done"
    reason = status["stopped_early"]
    assert "non-finite loss" in reason and "epoch 2, step 3" in reason and "last good checkpoint (epoch 1)" in reason
    folder = job_files.job_dir(cache_copy, "demo", "digits_cnn", status["job_id"])
    assert job_files.checkpoint_epoch(folder) == 1
    result = json.loads((folder / job_files.RESULT_FILE).read_text())
    assert result["stopped_early"] == reason and result["epochs_done"] == 1
    # the published scores are those of the epoch-1 checkpoint, and finite
    data = cache.load_benchmark(cache_copy, "demo", "digits_cnn")
    trained = data.trained[status["result"]["name"]]
    assert trained.meta["stopped_early"] == reason and np.isfinite(trained.id).all()
    from oodcore.training.flow import build_flow_task

    task = build_flow_task(train_config.TrainConfig.from_dict(result["options"]), data, cache_copy)
    job_files.load_checkpoint(folder, task.model)
    with torch.no_grad():
        s_id, _ = task.score()
    assert np.allclose(s_id, trained.id, atol=1e-6)
    assert "stopped early" in json.loads((folder / job_files.STATUS_FILE).read_text())["message"]


@pytest.mark.slow
def test_cancel_then_resume_matches_an_uninterrupted_run(cache_copy, tmp_path, demo_cache):
    cfg = train_config.TrainConfig(**SMALL_FLOW, ood_objective=True)
    folder_of = lambda st: job_files.job_dir(cache_copy, "demo", "digits_cnn", st["job_id"])  # noqa: E731

    def cancel_after_epoch_1(event, status):
        if event == "epoch" and status["epoch"] == 1:
            job_files.request_cancel(cache_copy, "demo", "digits_cnn", status["job_id"])

    first = jobs.run_job(cache_copy, cfg, progress=cancel_after_epoch_1, n_boot=0)
    assert first["state"] == "cancelled" and "epoch 1 is kept" in first["message"]
    folder = folder_of(first)
    assert job_files.checkpoint_epoch(folder) == 1 and (folder / job_files.OPTIMIZER_FILE).is_file()
    assert not (folder / job_files.CANCEL_FILE).exists() and job_files.read_lock(cache_copy) is None
    assert job_files.read_status(folder)["state"] == "cancelled"
    assert not any(f.suffix == ".pkl" for f in folder.iterdir())

    resumed = jobs.run_job(cache_copy, cfg, n_boot=0)  # the same options again: resumes automatically
    assert resumed["state"] == "done" and resumed["resumed_from"] == 1 and resumed["job_id"] == first["job_id"]
    assert resumed["result"]["epochs_done"] == 3
    log = job_files.read_loss(folder)
    assert sorted(log["epoch"].unique()) == [1, 2, 3] and log["global_step"].is_monotonic_increasing

    other = tmp_path / "other"
    shutil.copytree(demo_cache, other)
    straight = jobs.run_job(other, cfg, n_boot=0)
    a = cache.load_benchmark(cache_copy, "demo", "digits_cnn").trained[resumed["result"]["name"]]
    b = cache.load_benchmark(other, "demo", "digits_cnn").trained[straight["result"]["name"]]
    assert np.allclose(a.id, b.id, atol=1e-5) and np.allclose(a.ood, b.ood, atol=1e-5)

    by_id = jobs.run_job(
        cache_copy, None, resume=first["job_id"], n_boot=0
    )  # done + --resume: nothing left but scoring
    assert by_id["state"] == "done" and by_id["resumed_from"] == 3
    again = jobs.run_job(cache_copy, cfg, n_boot=0)  # a finished job started again trains from scratch
    assert again["resumed_from"] is None and sorted(job_files.read_loss(folder)["epoch"].unique()) == [1, 2, 3]


@pytest.mark.subprocess
def test_lock_refuses_a_second_job_and_takes_over_a_stale_one(cache_copy):
    job_files.acquire_lock(cache_copy, "someone-else", "demo", "digits_cnn")
    try:
        with pytest.raises(job_files.JobBusy, match="another training job is running.*someone-else"):
            jobs.run_job(cache_copy, train_config.TrainConfig(**SMALL_FLOW), n_boot=0)
        with pytest.raises(job_files.JobBusy):
            launch.start_job_process(cache_copy, train_config.TrainConfig(**SMALL_FLOW))
    finally:
        job_files.release_lock(cache_copy)
    assert not job_files.lock_path(cache_copy).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job_files.lock_path(cache_copy).write_text(json.dumps({"pid": dead.pid, "job_id": "crashed"}))
    assert job_files.read_lock(cache_copy) is None  # a dead holder does not count
    job_files.acquire_lock(cache_copy, "mine", "demo", "digits_cnn")
    assert json.loads(job_files.lock_path(cache_copy).read_text())["pid"] == os.getpid()
    job_files.release_lock(cache_copy)


@pytest.mark.subprocess
def test_a_killed_job_reads_as_failed_and_resumes(cache_copy):
    cfg = train_config.TrainConfig(**{**SMALL_FLOW, "epochs": 2})
    done = jobs.run_job(cache_copy, cfg, n_boot=0)
    folder = job_files.job_dir(cache_copy, "demo", "digits_cnn", done["job_id"])
    # pretend the process was SIGKILLed in epoch 2: status still says running, with a dead pid
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = json.loads((folder / job_files.STATUS_FILE).read_text())
    status.update(state="running", pid=dead.pid, epoch=1)
    (folder / job_files.STATUS_FILE).write_text(json.dumps(status))
    read = job_files.read_status(folder)
    assert read["state"] == "failed" and read["interrupted"] and "start it again to resume" in read["message"]
    again = jobs.run_job(cache_copy, cfg, n_boot=0)
    assert again["state"] == "done" and again["resumed_from"] == 2


@pytest.mark.slow
def test_pixel_flow_with_the_ood_objective_runs_end_to_end(cache_copy):
    cfg = train_config.TrainConfig(
        kind="flow",
        benchmark="demo",
        input="pixels",
        mask="cyclic",
        ood_objective=True,
        epochs=1,
        layers=4,
        width=4,
        bottleneck=2,
        batch_size=64,
    )
    status = jobs.run_job(cache_copy, cfg, n_boot=0)
    result = status["result"]
    assert status["state"] == "done" and result["name"] == "flow_pixels_cyclic_ood"
    assert result["baseline"]["method"] == "msp" and result["n_ood_scored"] == result["baseline"]["n_ood_scored"]
    assert "OOD exposure" in result["label"] and result["dims"] == 1024 and 0 <= result["auroc"] <= 1
    log = job_files.read_loss(job_files.job_dir(cache_copy, "demo", "digits_cnn", status["job_id"]))
    assert (log["ood_term"] >= 0).all() and np.isfinite(log["loss"]).all()


# ------------------------------------------------------------------ the command line


def test_cli_train_writes_the_report_fields_and_joins_the_demo_table(cache_copy, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "train",
                "energy",
                "--benchmark",
                "demo",
                "--input",
                "features",
                "--epochs",
                "2",
                "--bootstrap",
                "20",
                "--json",
                str(out),
                "--cache-dir",
                str(cache_copy),
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    assert "epoch 2/2 done" in printed.err and "energy_ft_head" in printed.out
    result = json.loads(out.read_text())
    assert ROW_FIELDS | {"baseline", "seconds", "stopped_early"} <= set(result)
    assert ROW_FIELDS <= set(result["baseline"]) and result["baseline"]["method"] == "energy"
    assert result["method"] == "energy_ft_head" and result["stopped_early"] is None and result["seconds"] > 0
    assert result["ci"]["auroc"][0] <= result["auroc"] <= result["ci"]["auroc"][1]
    report = tmp_path / "demo.json"
    assert main(["demo", "--cache-dir", str(cache_copy), "--json", str(report), "--bootstrap", "0"]) == 0
    assert "energy_ft_head" in capsys.readouterr().out
    row = next(r for r in json.loads(report.read_text())["results"] if r["method"] == "energy_ft_head")
    assert row["tuned_on"] and row["n_ood_scored"] == result["n_ood_scored"] < 896
    assert row["auroc"] == pytest.approx(result["auroc"])


def test_cli_train_rejects_mistakes_clearly(cache_copy, capsys):
    def err(*argv) -> str:
        assert main(["train", *argv, "--cache-dir", str(cache_copy)]) == 2
        return capsys.readouterr().err

    assert "does not apply to features" in err("flow", "--benchmark", "demo", "--input", "features", "--mask", "cyclic")
    assert "flow options" in err("energy", "--benchmark", "demo", "--mask", "halves")
    assert "give both --m-in and --m-out" in err("energy", "--benchmark", "demo", "--m-in", "-5")
    assert "no cached run" in err("energy", "--benchmark", "nope")
    shutil.copytree(cache_copy / "demo" / "digits_cnn", cache_copy / "other" / "digits_cnn")
    run_file = cache_copy / "other" / "digits_cnn" / "run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "benchmark": "other"}))
    assert "only the demo benchmark" in err("flow", "--benchmark", "other", "--input", "pixels")
    assert "no job" in err("flow", "--resume", "flow_features_halves-00000000")


# ------------------------------------------------------------------ the Training page


def training_page():
    """The Training page, opened through the app's navigation as a person would."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at.switch_page("pages/training.py").run()


@pytest.mark.slow
@pytest.mark.subprocess
def test_training_page_starts_a_job_shows_progress_and_lists_it(cache_copy, monkeypatch):

    monkeypatch.setenv("OODCORE_CACHE", str(cache_copy))
    monkeypatch.delenv("OODCORE_READONLY", raising=False)
    at = training_page()
    assert not at.exception, [e.value for e in at.exception]
    assert [s.value for s in at.subheader] == ["Current job", "Start a training run", "Finished runs"]
    assert any("No training job" in i.value for i in at.info)

    # a job already running on this cache: starting another one says so
    job_files.acquire_lock(cache_copy, "someone-else", "demo", "digits_cnn")
    try:
        at.button(key="train.start").click().run()
        assert any("another training job is running" in w.value for w in at.warning)
    finally:
        job_files.release_lock(cache_copy)

    at.radio(key="train.input.energy").set_value("features").run()
    at.number_input(key="train.epochs.energy.features").set_value(2).run()
    at.button(key="train.start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    text = " ".join(m.value for m in at.markdown)
    assert "energy_ft_head" in text or "Energy FT" in text
    assert any(s in text for s in ("**queued**", "**running**", "**done**"))
    deadline = time.time() + 120
    while time.time() < deadline:
        statuses = job_files.list_jobs(cache_copy, "demo", "digits_cnn")
        if statuses and statuses[0]["state"] not in job_files.STATES[:2]:
            break
        time.sleep(0.5)
    assert statuses[0]["state"] == "done", statuses[0].get("message")
    folder = job_files.job_dir(cache_copy, "demo", "digits_cnn", statuses[0]["job_id"])
    assert (folder / job_files.LOG_FILE).is_file() and (folder / job_files.LAUNCHER_FILE).is_file()

    at = training_page()  # a page reload
    assert not at.exception, [e.value for e in at.exception]
    assert any("**done**" in m.value for m in at.markdown)
    table = at.dataframe[0].value
    assert list(table["detector"]) == ["Energy FT (head, OOD exposure split)"]
    assert table["baseline"].iloc[0] == "Energy" and 0 < table["held-out AUROC (%)"].iloc[0] <= 100


def test_training_page_in_readonly_mode_starts_nothing(cache_copy, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("OODCORE_CACHE", str(cache_copy))
    monkeypatch.setenv("OODCORE_READONLY", "1")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    with pytest.raises(ValueError):
        at.switch_page("pages/training.py")  # not a page of a read-only deployment
    alone = AppTest.from_file(str(ROOT / "pages" / "training.py"), default_timeout=60).run()
    assert not alone.exception, [e.value for e in alone.exception]
    assert not [b for b in alone.button if b.key == "train.start"]
    assert "/" not in " ".join(i.value for i in alone.info)  # no server path
