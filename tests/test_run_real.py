"""`run` end to end on real ImageNet images with the offline EfficientNet-Lite0.

Emulates the official ImageNet-O layout from ../shared/imagenet-sample: ID = the
sample images of ImageNet-O's 200 classes; OOD = the other sample images filed
under ImageNet-O wnid folders. Bad files are mixed in. Our engine's AUROCs must
match an independent plain loop (PIL + transform + forward + scikit-learn).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from oodcore.cli.main import main
from oodcore.data.imagenet import wnid_to_index
from oodcore.store import cache

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def layout(shared_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    o_wnids = sorted((shared_dir / "imagenet-o-wnids.txt").read_text().split())
    sample = shared_dir / "imagenet-sample"
    id_dir, ood_dir = tmp / "val", tmp / "imagenet-o"
    k = 0
    for folder in sorted(sample.iterdir()):
        for img in sorted(folder.iterdir()):
            if folder.name in o_wnids:
                dest = id_dir / folder.name / img.name
            else:
                dest = ood_dir / o_wnids[k % len(o_wnids)] / img.name
                k += 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(img, dest)
    for wnid in o_wnids:
        (ood_dir / wnid).mkdir(parents=True, exist_ok=True)
    (ood_dir / o_wnids[0] / "empty.JPEG").write_bytes(b"")
    (ood_dir / o_wnids[1] / "notes.JPEG").write_text("this is not an image")
    (ood_dir / o_wnids[2] / "README.txt").write_text("ignored: not an image extension")
    gray = id_dir / sorted(os.listdir(id_dir))[0] / "gray.png"
    Image.open(next(iter(sorted((sample / gray.parent.name).iterdir())))).convert("L").save(gray)
    return id_dir, ood_dir, o_wnids


def plain_logits(paths, mask):
    """The independent computation: PIL + the model's transform + forward, no engine code."""
    from oodcore.models.registry import load_model

    bundle = load_model("efficientnet_lite0")
    out = []
    with torch.no_grad():
        for p in paths:
            x = bundle.transform(Image.open(p).convert("RGB"))[None]
            out.append(bundle.network(x)[0, mask].numpy())
    return np.stack(out).astype(np.float64)


def test_run_imagenet_o_protocol_matches_plain_loop(layout, tmp_path, capsys):
    id_dir, ood_dir, o_wnids = layout
    out_json = tmp_path / "r.json"
    rc = main(
        [
            "run",
            "--arch",
            "efficientnet_lite0",
            "--id-dir",
            str(id_dir),
            "--ood-dir",
            str(ood_dir),
            "--protocol",
            "imagenet-o",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(out_json),
            "--workers",
            "2",
            "--batch-size",
            "32",
            "--bootstrap",
            "0",
            "--name",
            "sample",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "empty.JPEG" in captured.err and "notes.JPEG" in captured.err  # skipped and reported
    report = json.loads(out_json.read_text())
    assert report["n_classes"] == 200
    assert sorted(os.path.basename(p) for p in report["skipped"]) == ["empty.JPEG", "notes.JPEG"]
    data = cache.load_benchmark(tmp_path / "cache", "sample", "efficientnet_lite0")
    assert data.class_ids == o_wnids
    n_id_files = sum(len(files) for _, _, files in os.walk(id_dir))
    assert len(data.id) + len(data.fit) == n_id_files  # grayscale image kept; fit split is disjoint
    assert not set(data.id.paths) & set(data.fit.paths)
    assert report["id_top1"] >= 0.8

    mask = np.asarray([wnid_to_index()[w] for w in o_wnids])
    ref_id = plain_logits([id_dir / p for p in data.id.paths], mask)
    ref_ood = plain_logits([ood_dir / p for p in data.ood.paths], mask)
    np.testing.assert_allclose(data.id.logits, ref_id, atol=1e-3)

    def auroc(s_id, s_ood):
        return roc_auc_score(np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))], np.r_[s_id, s_ood])

    def softmax_max(z):
        z = z - z.max(1, keepdims=True)
        return np.exp(z).max(1) / np.exp(z).sum(1)

    def neg_lse(z):
        m = z.max(1)
        return -(m + np.log(np.exp(z - m[:, None]).sum(1)))

    independent = {
        "msp": auroc(-softmax_max(ref_id), -softmax_max(ref_ood)),
        "maxlogit": auroc(-ref_id.max(1), -ref_ood.max(1)),
        "energy": auroc(neg_lse(ref_id), neg_lse(ref_ood)),
    }
    ours = {r["method"]: r["auroc"] for r in report["results"] if r["tuned_on"] is None}
    for name, value in independent.items():
        assert abs(ours[name] - value) < 0.02, (name, ours[name], value)


def test_rerun_is_served_from_cache_and_a_changed_file_invalidates_it(layout, tmp_path, monkeypatch):
    id_dir, ood_dir, _ = layout
    root = tmp_path / "cache"
    argv = [
        "run",
        "--arch",
        "efficientnet_lite0",
        "--id-dir",
        str(id_dir),
        "--ood-dir",
        str(ood_dir),
        "--cache-dir",
        str(root),
        "--limit",
        "12",
        "--workers",
        "0",
        "--bootstrap",
        "0",
        "--name",
        "small",
    ]
    assert main(argv) == 0
    first = cache.read_run(root, "small", "efficientnet_lite0")

    import oodcore.extraction.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("extraction ran although nothing changed")

    monkeypatch.setattr(pipeline, "extract_split", boom)
    assert main(argv) == 0  # unchanged inputs: every artifact is reused
    assert cache.read_run(root, "small", "efficientnet_lite0")["files"] == first["files"]
    monkeypatch.undo()

    data = cache.load_benchmark(root, "small", "efficientnet_lite0")
    victim = ood_dir / data.ood.paths[0]
    real = victim.resolve()
    victim.unlink()
    Image.open(real).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(victim, "JPEG")
    try:
        assert main(argv) == 0
        second = cache.read_run(root, "small", "efficientnet_lite0")
        assert second["files"]["ood"] != first["files"]["ood"]  # new key: recomputed, not served stale
        assert second["files"]["id"] == first["files"]["id"]
        assert not (root / "small" / "efficientnet_lite0" / first["files"]["ood"]).exists()
    finally:
        victim.unlink()
        os.symlink(real, victim)
