"""The fault suite (issue #14): every way a cache, a folder or a command line was seen to break, reproduced.

Each case ends in a clear one-line message, a recomputation or a refusal, and nothing is lost:
truncated / garbled / bit-flipped artifacts, a run.json without `files` or cut short, same-name
folders, two runs of one (benchmark, arch) at once, a symlink loop, a broken symlink, an unusable
cache folder, a double launch, a lock nobody can vouch for, and bad arguments (--weights /missing.pth,
--bootstrap -1, --methods ,) refused before any model loads.
"""

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

from oodcore.cli.appserver import streamlit_server
from oodcore.cli.main import main
from oodcore.data.folders import scan_image_folder
from oodcore.extraction import demo, runner
from oodcore.store import arrays, atomic, cache, files, integrity, locks

BENCH, ARCH = demo.BENCHMARK, demo.ARCH
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_copy(demo_cache, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    return root


def folder_of(root: Path) -> Path:
    return cache.arch_dir(root, BENCH, ARCH)


def artifact(root: Path, role: str) -> Path:
    return folder_of(root) / cache.read_run(root, BENCH, ARCH)["files"][role]


def array_file(root: Path, role: str, array: str) -> Path:
    """One .npy of an artifact folder (cache format 2)."""
    return artifact(root, role) / f"{array}.npy"


def demo_numbers(root: Path, tmp_path: Path, capsys) -> list:
    out = tmp_path / f"report-{time.monotonic_ns()}.json"
    assert main(["demo", "--cache-dir", str(root), "--bootstrap", "0", "--json", str(out)]) == 0
    capsys.readouterr()
    return [(r["method"], r["auroc"], r["fpr95"], r["aupr_out"]) for r in json.loads(out.read_text())["results"]]


def one_clean_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "allow_pickle" not in err
    return lines[0]


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 3)


def garble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ damaged artifacts


@pytest.mark.parametrize("damage", [truncate, garble, flip_byte], ids=["truncate", "garble", "flip-byte"])
def test_a_damaged_artifact_is_one_typed_error_naming_the_file_and_the_repair(cache_copy, damage, capsys):
    victim = array_file(cache_copy, "ood", "logits")
    damage(victim)
    with pytest.raises(integrity.ArtifactDamaged) as info:
        cache.load_benchmark(cache_copy, BENCH, ARCH)
    assert f"{victim.parent.name}/logits.npy" in str(info.value) and "verify --repair" in str(info.value)
    assert "allow_pickle" not in str(info.value) and str(cache_copy) not in info.value.public()
    # export and list: one line, exit 2 / a "damaged" row, never a traceback
    assert (
        main(
            [
                "export",
                "--benchmark",
                BENCH,
                "--arch",
                ARCH,
                "--npz",
                str(cache_copy / "x.npz"),
                "--cache-dir",
                str(cache_copy),
            ]
        )
        == 2
    )
    assert victim.name in one_clean_line(capsys.readouterr().err)
    assert main(["verify", "--cache-dir", str(cache_copy)]) == 1
    assert victim.name in capsys.readouterr().out


def test_unrecorded_garbled_file_never_suggests_pickles(tmp_path):
    bad = tmp_path / "x.npz"
    garble_target = tmp_path / "y.npz"
    atomic.write_npz(garble_target, {"a": np.arange(1000)})
    bad.write_bytes(b"\x93NUMPY" + os.urandom(200))  # looks like an .npy whose header is garbage
    for path in (bad, garble_target):
        if path is garble_target:
            garble(path)
        with pytest.raises(integrity.ArtifactDamaged) as info:
            atomic.load_npz(path)
        assert "pickle" not in info.value.public().lower() and path.name in str(info.value)
    folder = arrays.write_arrays(tmp_path / "z-0123456789abcdef.arrays", {"a": np.arange(1000)})
    (folder / "a.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\x40\x00" + b"{'descr': '|O', 'fortran_order': False}")
    with pytest.raises(integrity.ArtifactDamaged) as info:
        integrity.load_arrays(folder)  # no record: the structural check alone must give our error
    assert "pickle" not in info.value.public().lower() and "a.npy" in str(info.value)


def test_demo_recomputes_only_the_damaged_artifact_with_identical_numbers(cache_copy, tmp_path, capsys, monkeypatch):
    before = demo_numbers(cache_copy, tmp_path, capsys)
    victim = artifact(cache_copy, "ood")
    others = {p.name: p.stat().st_mtime_ns for p in folder_of(cache_copy).glob("*-*.*") if p != victim}
    truncate(victim / "features.npy")
    monkeypatch.setattr(demo, "train_cnn", lambda *a, **k: pytest.fail("the intact CNN must be reused"))
    assert main(["demo", "--cache-dir", str(cache_copy), "--bootstrap", "0", "--methods", "msp"]) == 0
    err = capsys.readouterr().err
    assert f"{victim.name}/features.npy is damaged" in err and "recomputing" in err
    monkeypatch.undo()
    assert demo_numbers(cache_copy, tmp_path, capsys) == before
    for name, mtime in others.items():  # nothing else was recomputed or rewritten
        if not name.startswith(("head-", "odin_ood-")):  # the head is cheap and rewritten; ood's grid goes with it
            assert (folder_of(cache_copy) / name).stat().st_mtime_ns == mtime, name


@pytest.mark.slow  # ~3 s: a full repair of the demo
def test_verify_repair_brings_a_damaged_demo_back_to_identical_numbers(cache_copy, tmp_path, capsys):
    before = demo_numbers(cache_copy, tmp_path, capsys)
    flip_byte(array_file(cache_copy, "id", "features"))
    garble(array_file(cache_copy, "odin_ood", "scores"))
    shutil.rmtree(artifact(cache_copy, "head"))
    assert main(["verify", "--cache-dir", str(cache_copy)]) == 1
    out = capsys.readouterr().out
    assert out.count("damaged") >= 2 and "missing" in out
    assert main(["verify", "--repair", "--cache-dir", str(cache_copy)]) == 0
    assert "repaired" in capsys.readouterr().out
    assert main(["verify", "--cache-dir", str(cache_copy)]) == 0
    assert demo_numbers(cache_copy, tmp_path, capsys) == before


def test_arrays_are_memory_mapped_read_only_and_streamed_in_chunks(cache_copy, tmp_path):
    data = cache.load_benchmark(cache_copy, BENCH, ARCH)
    for arr in (data.id.features, data.ood.logits, data.fit.features, data.odin.id):
        assert isinstance(arr.base, np.memmap) or isinstance(getattr(arr.base, "base", None), np.memmap)
        assert not arr.flags.writeable
    rng = np.random.default_rng(0)
    chunks = [rng.normal(size=(n, 5)).astype(np.float32) for n in (3, 0, 7)]
    with arrays.ArtifactWriter(tmp_path / "x-0123456789abcdef.arrays") as w:
        for c in chunks:
            w.append(rows=c, names=np.asarray([f"img{i}" * (i + 1) for i in range(len(c))]))
        assert not (tmp_path / "x-0123456789abcdef.arrays").exists()  # nothing visible before finalize
    back = integrity.load_arrays(tmp_path / "x-0123456789abcdef.arrays")
    np.testing.assert_array_equal(back["rows"], np.concatenate(chunks))
    assert len(back["names"]) == 10
    with pytest.raises(RuntimeError):
        with arrays.ArtifactWriter(tmp_path / "y-0123456789abcdef.arrays") as w:
            w.append(rows=chunks[0])
            raise RuntimeError("killed mid-write")
    assert not list(tmp_path.glob("y-*")) and not list(tmp_path.glob(".y-*"))


def test_a_format_1_cache_is_converted_by_verify_repair_with_identical_numbers(cache_copy, tmp_path, capsys):
    before = demo_numbers(cache_copy, tmp_path, capsys)
    folder = folder_of(cache_copy)
    run = json.loads((folder / cache.RUN_FILE).read_text())
    files = {}
    for role, name in run["files"].items():  # write the cache as the previous version did: .npz files
        if name.endswith(".arrays"):
            atomic.write_npz(folder / (name[: -len(".arrays")] + ".npz"), dict(integrity.load_arrays(folder / name)))
            shutil.rmtree(folder / name)
            name = name[: -len(".arrays")] + ".npz"
        files[role] = name
    run = {**{k: v for k, v in run.items() if k != "integrity"}, "format": 1, "files": files}
    (folder / cache.RUN_FILE).write_text(json.dumps(run))
    assert main(["list", "--cache-dir", str(cache_copy)]) == 0
    assert "old cache format 1" in capsys.readouterr().out
    assert main(["verify", "--repair", "--cache-dir", str(cache_copy)]) == 0
    assert "converting cache format 1" in capsys.readouterr().out
    assert not list(folder.glob("*.npz")) and cache.read_run(cache_copy, BENCH, ARCH)["format"] == 2
    assert demo_numbers(cache_copy, tmp_path, capsys) == before


# ------------------------------------------------------------------ damaged run.json


def test_run_json_without_files(cache_copy, tmp_path, capsys):
    before = demo_numbers(cache_copy, tmp_path, capsys)
    path = folder_of(cache_copy) / cache.RUN_FILE
    run = json.loads(path.read_text())
    del run["files"]
    path.write_text(json.dumps(run))
    assert main(["list", "--cache-dir", str(cache_copy)]) == 0
    out = capsys.readouterr().out
    assert "damaged" in out and "lacks its list of files" in out and "KeyError" not in out
    assert (
        main(
            [
                "export",
                "--benchmark",
                BENCH,
                "--arch",
                ARCH,
                "--npz",
                str(tmp_path / "x.npz"),
                "--cache-dir",
                str(cache_copy),
            ]
        )
        == 2
    )
    assert "run.json is damaged" in one_clean_line(capsys.readouterr().err)
    assert main(["verify", "--repair", "--cache-dir", str(cache_copy)]) == 0
    capsys.readouterr()
    assert demo_numbers(cache_copy, tmp_path, capsys) == before


def test_truncated_run_json_is_reported_and_rebuilt_from_the_intact_files(cache_copy, tmp_path, capsys, monkeypatch):
    before = demo_numbers(cache_copy, tmp_path, capsys)
    path = folder_of(cache_copy) / cache.RUN_FILE
    path.write_text(path.read_text()[:200])
    assert main(["list", "--cache-dir", str(cache_copy)]) == 0
    out = capsys.readouterr().out
    assert "run.json is damaged" in out and "verify --repair" in out
    with pytest.raises(integrity.CacheDamaged):
        cache.read_run(cache_copy, BENCH, ARCH)
    monkeypatch.setattr(demo, "train_cnn", lambda *a, **k: pytest.fail("the intact CNN must be reused"))
    assert demo_numbers(cache_copy, tmp_path, capsys) == before


def test_a_damaged_fitted_state_is_refitted_and_verify_repair_removes_it(cache_copy, tmp_path, capsys):
    before = demo_numbers(cache_copy, tmp_path, capsys)  # fits and stores the fitted states
    fitted = sorted((folder_of(cache_copy) / cache.FITTED_DIR).glob("*.npz"))
    assert fitted
    truncate(fitted[0])
    assert demo_numbers(cache_copy, tmp_path, capsys) == before  # refitted, same numbers, no crash
    truncate(fitted[0])
    assert main(["verify", "--cache-dir", str(cache_copy)]) == 1
    assert fitted[0].name in capsys.readouterr().out
    assert main(["verify", "--repair", "--cache-dir", str(cache_copy)]) == 0
    assert "refitted on next use" in capsys.readouterr().out and not fitted[0].exists()


def test_a_garbled_trained_detector_is_reported_not_silently_dropped(cache_copy, capsys):
    folder = folder_of(cache_copy)
    n = cache.load_benchmark(cache_copy, BENCH, ARCH)
    cache.save_trained(folder, "fake_ft", np.zeros(len(n.id)), np.ones(len(n.ood)), {"label": "fake"})
    assert "fake_ft" in cache.load_benchmark(cache_copy, BENCH, ARCH).trained
    flip_byte(cache.trained_paths(folder, "fake_ft")[1])
    data = cache.load_benchmark(cache_copy, BENCH, ARCH)
    assert "fake_ft" not in data.trained and any("fake_ft" in d for d in data.meta["damaged_trained"])
    assert main(["demo", "--cache-dir", str(cache_copy), "--bootstrap", "0", "--methods", "msp"]) == 0
    assert "fake_ft" in capsys.readouterr().err
    assert any("fake_ft" in str(p) for p in cache.verify_run(cache_copy, BENCH, ARCH))


# ------------------------------------------------------------------ no silent loss


def test_same_base_name_folders_get_different_benchmarks(tmp_path):
    a, b = tmp_path / "data" / "id", tmp_path / "data2" / "id"
    ood = tmp_path / "ood"
    names = {runner.default_name(runner.RunOptions(arch="m", id_dir=str(d), ood_dir=str(ood))) for d in (a, b)}
    assert len(names) == 2 and all(n.startswith("id-vs-ood-imagenet-o-") for n in names)


def test_reusing_a_name_for_other_folders_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import oodcore.models.registry as registry

    id1, id2, ood = make_folders(tmp_path / "data" / "id"), make_folders(tmp_path / "data2" / "id"), None
    ood = make_folders(tmp_path / "ood", n=2)
    root = tmp_path / "cache"
    theirs = runner.RunOptions(arch="efficientnet_lite0", id_dir=str(id1), ood_dir=str(ood), name="shared")
    folder = cache.arch_dir(root, "shared", "efficientnet_lite0")
    folder.mkdir(parents=True)
    (folder / "precious.npz").write_bytes(b"keep me")
    (folder / cache.RUN_FILE).write_text(json.dumps({"format": 1, "inputs": runner.run_inputs(theirs)}))
    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
    argv = ["run", "--arch", "efficientnet_lite0", "--id-dir", str(id2), "--ood-dir", str(ood), "--name", "shared"]
    assert main(argv + ["--cache-dir", str(root)]) == 2
    line = one_clean_line(capsys.readouterr().err)
    assert "already holds a run of other inputs" in line and "--replace" in line
    assert (folder / "precious.npz").read_bytes() == b"keep me"
    with pytest.raises(runner.NameInUse):
        runner.check_name(root, "shared", runner.RunOptions(arch="x", id_dir=str(id2), ood_dir=str(ood)))
    runner.check_name(root, "shared", theirs)  # the same inputs (another arch, a rerun) are fine
    runner.check_name(root, "shared", runner.RunOptions(arch="x", id_dir=str(id2), ood_dir=str(ood), replace=True))


def test_a_second_run_of_the_same_pair_waits_then_fails_clearly(tmp_path, monkeypatch):
    import oodcore.models.registry as registry

    id_dir, ood = make_folders(tmp_path / "id"), make_folders(tmp_path / "ood", n=2)
    root = tmp_path / "cache"
    opts = runner.RunOptions(arch="efficientnet_lite0", id_dir=str(id_dir), ood_dir=str(ood), name="b", lock_wait=0.5)
    said = []
    opts.log = said.append
    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("ran although the lock is held"))
    with locks.run_lock(cache.arch_dir(root, "b", "efficientnet_lite0"), "the first run"):
        with pytest.raises(locks.LockBusy, match="another run of b · efficientnet_lite0 is in progress"):
            runner.run_study(opts, root)
    assert said and "waiting for another run" in said[0] and "the first run" in said[0]


def test_superseded_artifacts_are_only_deleted_when_no_reader_holds_the_run(cache_copy):
    folder = folder_of(cache_copy)
    old = folder / "ood-0123456789abcdef.arrays"
    arrays.write_arrays(old, {"logits": np.zeros((2, 2))})
    keep = set(cache.read_run(cache_copy, BENCH, ARCH)["files"].values())
    with locks.reading(folder):
        assert cache.collect_garbage(folder, keep) == 0 and old.exists()
    assert cache.collect_garbage(folder, keep) == 1 and not old.exists()
    assert all((folder / n).exists() for n in keep)


def test_stale_temp_files_are_cleaned_on_the_next_write(tmp_path):
    stale, fresh = tmp_path / ".a.npz.x1.tmp", tmp_path / ".b.npz.x2.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"half a file")
    old = time.time() - atomic.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    files._SWEPT.clear()
    atomic.write_json(tmp_path / "x.json", {"a": 1})
    assert not stale.exists() and fresh.exists()


# ------------------------------------------------------------------ folders


def make_folders(root: Path, n: int = 3, wnids=("n01440764", "n01443537")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(len(str(root)))
    for w in wnids:
        (root / w).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / w / f"{i}.JPEG")
    return root


def test_a_symlink_loop_is_not_followed(tmp_path):
    root = make_folders(tmp_path / "id")
    before = scan_image_folder(root)
    os.symlink("..", root / "n01440764" / "loop")
    os.symlink(root / "n01443537", root / "n01440764" / "sibling")
    after = scan_image_folder(root)
    assert [e.relpath for e in after.entries] == [e.relpath for e in before.entries]
    reasons = {d["path"]: d["error"] for d in after.skipped}
    assert "symlink loop" in reasons["n01440764/loop/"] and "n01440764/sibling/" in reasons


def test_a_broken_symlink_is_listed_by_path_with_its_reason(tmp_path):
    from oodcore.data.protocols import build_protocol

    id_dir, ood = make_folders(tmp_path / "id"), make_folders(tmp_path / "ood", n=2)
    os.symlink(tmp_path / "gone.JPEG", ood / "n01440764" / "dangling.JPEG")
    scan = scan_image_folder(ood)
    assert scan.skipped == [
        {"path": "n01440764/dangling.JPEG", "error": f"broken symlink (-> {tmp_path / 'gone.JPEG'})"}
    ]
    spec = build_protocol(id_dir, ood, "imagenet-o")
    assert spec.scan_skipped[0]["split"] == "ood" and spec.scan_skipped[0]["path"] == "n01440764/dangling.JPEG"


# ------------------------------------------------------------------ fail early


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "/missing.pth"], "--weights /missing.pth is not a file"),
        (["--bootstrap", "-1"], "--bootstrap must be >= 0"),
        (["--methods", ","], "names no method"),
        (["--methods", "msp,nope"], "unknown method"),
    ],
)
def test_bad_run_arguments_fail_before_any_model_loads(tmp_path, extra, message, capsys, monkeypatch):
    import oodcore.models.registry as registry

    id_dir, ood = make_folders(tmp_path / "id"), make_folders(tmp_path / "ood", n=2)
    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
    argv = ["run", "--arch", "efficientnet_lite0", "--id-dir", str(id_dir), "--ood-dir", str(ood)]
    assert main(argv + extra + ["--cache-dir", str(tmp_path / "cache")]) == 2
    assert message in one_clean_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["demo"], ["demo", "--methods", ","]])
def test_demo_checks_arguments_and_cache_folder_first(tmp_path, command, capsys, monkeypatch):
    monkeypatch.setattr(demo, "train_cnn", lambda *a, **k: pytest.fail("built although the arguments are bad"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main([*command, "--cache-dir", str(blocker / "cache")]) == 2
    line = one_clean_line(capsys.readouterr().err)
    assert ("not writable" in line) if command == ["demo"] else ("names no method" in line)


def test_read_only_cache_folder_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import oodcore.models.registry as registry

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the not-a-folder case above covers an unwritable cache")
    id_dir, ood = make_folders(tmp_path / "id"), make_folders(tmp_path / "ood", n=2)
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
    try:
        argv = ["run", "--arch", "efficientnet_lite0", "--id-dir", str(id_dir), "--ood-dir", str(ood)]
        assert main(argv + ["--cache-dir", str(root)]) == 2
        assert "not writable" in one_clean_line(capsys.readouterr().err)
    finally:
        root.chmod(0o755)


def test_a_read_only_cache_can_still_be_read(cache_copy, capsys, monkeypatch):
    """Readers take the shared lock only where they can; an unwritable folder is read as it is."""
    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).endswith(locks.READ_LOCK):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    (folder_of(cache_copy) / locks.READ_LOCK).unlink(missing_ok=True)
    monkeypatch.setattr(locks.os, "open", refuse)
    data = cache.load_benchmark(cache_copy, BENCH, ARCH)
    assert len(data.id) > 0
    monkeypatch.undo()
    with pytest.raises(cache.CacheMissing):
        cache.load_benchmark(cache_copy, "nothing", "here")
    assert not (cache_copy / "nothing").exists()  # a failed read leaves no folder behind


def test_an_unexpected_error_is_one_line(capsys, monkeypatch):
    import oodcore.cli.main as cli

    monkeypatch.setitem(cli.COMMANDS, "list", lambda args: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")))
    monkeypatch.delenv("OODCORE_DEBUG", raising=False)
    assert main(["list"]) == 2
    assert "boom" in one_clean_line(capsys.readouterr().err)


# ------------------------------------------------------------------ training launcher and locks


def test_double_launch_starts_one_job(cache_copy, monkeypatch):
    from oodcore.training import config as train_config
    from oodcore.training import launch

    started = []

    class FakeProc:
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.pid = os.getpid()  # alive, like a launcher that has not yet taken the training lock

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakeProc)
    cfg = train_config.TrainConfig(kind="flow", benchmark="demo", input="features", mask="halves", epochs=1)
    first = launch.start_job_process(cache_copy, cfg)
    second = launch.start_job_process(cache_copy, cfg)  # the double click
    assert first == second and len(started) == 1
    other = train_config.TrainConfig(kind="energy", benchmark="demo", epochs=1)
    from oodcore.training.files import JobBusy

    with pytest.raises(JobBusy, match="is starting"):
        launch.start_job_process(cache_copy, other)
    assert len(started) == 1


def test_a_lock_without_a_verifiable_owner_expires(tmp_path):
    from oodcore.training import files as job_files

    alive_unrelated = os.getppid()
    for age, busy in ((10, True), (job_files.UNVERIFIED_LOCK_SECONDS + 10, False)):
        job_files.lock_path(tmp_path).write_text(
            json.dumps({"pid": alive_unrelated, "job_id": "x", "started": time.time() - age})
        )
        assert (job_files.read_lock(tmp_path) is not None) is busy


# ------------------------------------------------------------------ the app


def _app_with(root: Path, monkeypatch, readonly: bool):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("OODCORE_CACHE", str(root))
    if readonly:
        monkeypatch.setenv("OODCORE_READONLY", "1")
    else:
        monkeypatch.delenv("OODCORE_READONLY", raising=False)
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)


@pytest.mark.parametrize(
    "page", ["pages/leaderboard.py", "pages/curves.py", "pages/odin_tuner.py", "pages/misfires.py"]
)
def test_pages_show_a_message_for_a_damaged_run_never_a_traceback(cache_copy, monkeypatch, page):
    garble(array_file(cache_copy, "ood", "logits"))
    garble(array_file(cache_copy, "odin_id", "scores"))
    at = _app_with(cache_copy, monkeypatch, readonly=True).run()
    if page != "pages/leaderboard.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    text = " ".join(e.value for e in at.error)
    assert "demo · digits_cnn" in text and "verify --repair" in text
    assert str(cache_copy) not in text and "/tmp" not in text


def test_readonly_sets_error_details_and_upload_cap_in_code(cache_copy, monkeypatch):
    from streamlit import config

    before = (config.get_option("client.showErrorDetails"), config.get_option("server.maxUploadSize"))
    try:
        config.set_option("server.maxUploadSize", 200)
        at = _app_with(cache_copy, monkeypatch, readonly=True).run()
        assert not at.exception
        assert config.get_option("client.showErrorDetails") == "none"
        assert config.get_option("server.maxUploadSize") == 20
    finally:
        config.set_option("client.showErrorDetails", before[0])
        config.set_option("server.maxUploadSize", before[1])


def test_damaged_run_json_in_readonly_app_is_named_without_paths(cache_copy, monkeypatch):
    (folder_of(cache_copy) / cache.RUN_FILE).write_text("{")
    at = _app_with(cache_copy, monkeypatch, readonly=True).run()
    assert not at.exception
    text = " ".join(e.value for e in at.error)
    assert "run.json is damaged" in text and str(cache_copy) not in text
    assert not list(folder_of(cache_copy).glob("parts"))  # read-only: nothing rebuilt


# ------------------------------------------------------------------ real runs (slow)


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_concurrent_runs_of_one_pair_both_finish_and_nothing_is_lost(tmp_path):
    """Two `run`s of the same (benchmark, arch) at once: the second waits, reuses, and neither loses files.

    The OOD folder also holds a broken symlink, which both list by path."""
    id_dir, ood = make_folders(tmp_path / "id", n=5), make_folders(tmp_path / "ood", n=3)
    os.symlink(tmp_path / "gone.JPEG", ood / "n01440764" / "dangling.JPEG")
    root = tmp_path / "cache"
    argv = [sys.executable, "-m", "oodcore", "run", "--arch", "efficientnet_lite0", "--id-dir", str(id_dir)]
    argv += ["--ood-dir", str(ood), "--workers", "0", "--bootstrap", "0", "--cache-dir", str(root), "--json"]
    env = dict(os.environ)  # `-m oodcore` from the checkout's root imports this checkout
    procs = [
        subprocess.Popen(
            [*argv, str(tmp_path / f"r{i}.json")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "dangling.JPEG" in err and "broken symlink" in err and "Traceback" not in err
    reports = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert reports[0]["results"] == reports[1]["results"]
    assert "n01440764/dangling.JPEG" in reports[0]["skipped"]
    reason = next(s for s in reports[0]["skipped_reasons"] if s["path"] == "n01440764/dangling.JPEG")
    assert reason["split"] == "ood" and reason["error"].startswith("broken symlink")
    bench = reports[0]["benchmark"]
    assert cache.verify_run(root, bench, "efficientnet_lite0") == []
    run = cache.read_run(root, bench, "efficientnet_lite0")
    assert run["rerun"].startswith("python -m oodcore run") and f"--name {bench}" in run["rerun"]


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.subprocess
def test_readonly_deployment_with_a_damaged_cache_in_a_browser(demo_cache, tmp_path, browser):
    """Headless Chromium, Streamlit started outside the repository: a message on every page, no traceback, no path."""
    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    garble(array_file(root, "ood", "logits"))
    elsewhere = tmp_path / "elsewhere"  # no .streamlit/config.toml here: the code's settings must hold
    elsewhere.mkdir()
    env = {**os.environ, "OODCORE_CACHE": str(root), "OODCORE_READONLY": "1"}  # app.py's folder is on sys.path
    with streamlit_server(ROOT / "app.py", cwd=elsewhere, env=env, log=tmp_path / "server.log", timeout=90) as server:
        page = browser.new_page()
        for path in ("", "study", "curves", "odin_tuner", "misfires"):
            page.goto(f"{server.url}/{path}")
            page.get_by_text("cannot be read").first.wait_for(timeout=90_000)
            time.sleep(0.5)
            body = page.inner_text("body")
            assert "demo · digits_cnn" in body and "verify --repair" in body, body
            assert "Traceback" not in body and str(root) not in body and "/tmp" not in body, body
            assert not page.locator('[data-testid="stException"]').count()
        page.close()


@pytest.mark.slow
def test_float16_features_are_stored_half_size_and_read_through_the_maps(tmp_path, capsys):
    id_dir, ood = make_folders(tmp_path / "id", n=5), make_folders(tmp_path / "ood", n=3)
    root = tmp_path / "cache"
    base = ["run", "--arch", "efficientnet_lite0", "--id-dir", str(id_dir), "--ood-dir", str(ood), "--workers", "0"]
    base += ["--bootstrap", "0", "--methods", "msp,energy,mahalanobis", "--cache-dir", str(root)]
    out = {}
    for dtype in ("float32", "float16"):
        assert main([*base, "--feature-dtype", dtype, "--name", dtype, "--json", str(tmp_path / f"{dtype}.json")]) == 0
        out[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())
    capsys.readouterr()
    full, half = (cache.load_benchmark(root, d, "efficientnet_lite0") for d in ("float32", "float16"))
    assert half.id.features.dtype == np.float16 and full.id.features.dtype == np.float32
    assert half.fit.features.dtype == np.float16  # the ID partition keeps the stored dtype
    np.testing.assert_allclose(half.id.features, full.id.features, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(half.id.logits, full.id.logits)
    rows = {d: {r["method"]: r["auroc"] for r in out[d]["results"]} for d in out}
    assert rows["float16"]["msp"] == rows["float32"]["msp"] and rows["float16"]["energy"] == rows["float32"]["energy"]
    assert abs(rows["float16"]["mahalanobis"] - rows["float32"]["mahalanobis"]) < 0.05
    assert "--feature-dtype float16" in half.meta["rerun"]
    feats = cache.arch_dir(root, "float16", "efficientnet_lite0") / half.meta["files"]["id"] / "features.npy"
    assert (
        feats.stat().st_size
        < 0.6
        * (cache.arch_dir(root, "float32", "efficientnet_lite0") / full.meta["files"]["id"] / "features.npy")
        .stat()
        .st_size
    )
