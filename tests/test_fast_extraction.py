"""The fast extraction path gives the same outputs as the plain one; memory stays bounded; fallbacks hold on CPU."""

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from oodcore.data.dataset import ImageFileDataset, normalise_batch, split_transform
from oodcore.data.folders import scan_image_folder
from oodcore.data.images import BadImageError, load_rgb, make_thumbnail
from oodcore.extraction.odin import gradient_sign, gradient_signs
from oodcore.extraction.pipeline import extract_split, prepare_features
from oodcore.extraction.stream import open_npz_maps, take_rows, write_npz_stream
from oodcore.store import thumbs
from tests.test_extract import TinyBundle, make_tree

TF = T.Compose(
    [
        T.Resize(20, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(16),
        T.ToTensor(),
        T.Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.5]),
    ]
)


def jpeg_tree(root, n=9, size=(48, 40), bad=()):
    from oodcore.data.imagenet import imagenet_wnids

    rng = np.random.default_rng(1)
    for i in range(n):
        folder = root / imagenet_wnids()[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"im{i:03d}.jpg"
        if i in bad:
            path.write_bytes(b"\xff\xd8\xff garbage")
        else:
            small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            small.save(path, quality=92)
    return root


def test_uint8_path_gives_bit_identical_inputs(tmp_path):
    root = jpeg_tree(tmp_path / "i")
    scan = scan_image_folder(root)
    fast = ImageFileDataset.for_model(root, scan.entries, TF, (3, 16, 16))
    plain = ImageFileDataset(root, scan.entries, TF, image_shape=(3, 16, 16))
    assert fast.uint8 and fast.mean == pytest.approx((0.5, 0.4, 0.3))
    x = normalise_batch(torch.stack([fast[i]["image"] for i in range(len(fast))]), fast.mean, fast.std)
    ref = torch.stack([plain[i]["image"] for i in range(len(plain))])
    assert torch.equal(x, ref)
    # the thumbnail is the same JPEG the plain path would pack
    assert fast[0]["thumb"] == thumbs.encode_one(plain[0]["thumb"].numpy())


def test_split_transform_refuses_other_pipelines():
    assert split_transform(T.Compose([T.Resize(8), T.ToTensor()])) is None
    assert split_transform(lambda img: img) is None
    assert split_transform(T.Compose([T.RandomCrop(8), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])) is None
    pil, mean, std, target = split_transform(TF)
    assert target == 20 and std == pytest.approx((0.2, 0.25, 0.5))


def test_streamed_artifact_equals_in_memory_result(tmp_path):
    root = jpeg_tree(tmp_path / "i", n=11, bad=(4,))
    scan = scan_image_folder(root)
    paths = [e.relpath for e in scan.entries]
    model = TinyBundle()
    ds = ImageFileDataset.for_model(root, scan.entries, TF, (3, 16, 16))
    mem, skipped = extract_split(model, ds, paths, np.array([3, 9]), tmp_path / "p1", batch_size=4)
    labels = np.arange(len(paths)) * 10
    small, skipped2 = extract_split(
        model,
        ds,
        paths,
        np.array([3, 9]),
        tmp_path / "p2",
        batch_size=4,
        out_path=tmp_path / "a.npz",
        row_arrays={"labels": labels},
    )
    assert skipped == skipped2 and len(skipped) == 1 and "im004" in skipped[0]["path"]
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        for key, value in mem.items():
            np.testing.assert_array_equal(z[key], value, err_msg=key)
        np.testing.assert_array_equal(z["labels"], labels[mem["index"]])
        assert list(z["skipped_paths"]) == [skipped[0]["path"]]
    np.testing.assert_array_equal(small["index"], mem["index"])
    # logits agree with a plain forward of the float pipeline, thumbnails with make_thumbnail
    plain = ImageFileDataset(root, scan.entries, TF, image_shape=(3, 16, 16))
    for row, i in enumerate(mem["index"]):
        with torch.no_grad():
            expected = model.network(plain[int(i)]["image"][None])[0, [3, 9]].numpy()
        np.testing.assert_allclose(mem["logits"][row], expected, rtol=1e-5, atol=1e-6)
        thumb = np.asarray(thumbs.unpack_one(mem["thumb_data"], mem["thumb_offsets"], row))
        want = np.asarray(Image.open(io.BytesIO(thumbs.encode_one(make_thumbnail(load_rgb(plain.path(int(i))))))))
        np.testing.assert_array_equal(thumb, want)


def test_npz_stream_and_maps(tmp_path):
    a = np.arange(20, dtype=np.float32).reshape(5, 4)
    s = np.asarray(["x", "yz"])
    write_npz_stream(
        tmp_path / "s.npz",
        {"a": (a.dtype, a.shape, take_rows(a, np.arange(5), block=2)), "s": (s.dtype, s.shape, lambda: [s])},
    )
    np.savez(tmp_path / "n.npz", a=a, s=s)
    for name in ("s.npz", "n.npz"):
        maps = open_npz_maps(tmp_path / name)
        np.testing.assert_array_equal(maps["a"], a)
        np.testing.assert_array_equal(maps["s"], s)
        with np.load(tmp_path / name, allow_pickle=False) as z:
            np.testing.assert_array_equal(z["a"], a)
    with pytest.raises(ValueError, match="needs"):
        write_npz_stream(tmp_path / "bad.npz", {"a": (a.dtype, (6, 4), lambda: [a])})
    assert not (tmp_path / "bad.npz").exists()
    with zipfile.ZipFile(tmp_path / "c.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", b"x")
    with pytest.raises(ValueError, match="compressed"):
        open_npz_maps(tmp_path / "c.npz")


def test_memory_budget_drafts_jpegs_and_skips_what_cannot_shrink(tmp_path):
    Image.new("RGB", (800, 600), (10, 20, 30)).save(tmp_path / "big.jpg")
    Image.new("RGB", (800, 600), (10, 20, 30)).save(tmp_path / "big.png")
    budget = 400 * 300 * 3  # fits only at 1/2 scale
    assert load_rgb(tmp_path / "big.jpg").size == (800, 600)
    assert load_rgb(tmp_path / "big.jpg", max_decoded_bytes=budget).size == (100, 75)  # coarsest scale
    with pytest.raises(BadImageError) as e:
        load_rgb(tmp_path / "big.png", max_decoded_bytes=budget)
    assert e.value.reason == "over memory budget" and "800x600" in str(e.value)
    # draft for a resize target: the coarsest DCT scale keeping the shorter side >= target
    assert load_rgb(tmp_path / "big.jpg", target_side=150).size == (200, 150)
    assert load_rgb(tmp_path / "big.jpg", target_side=301).size == (800, 600)  # under 2x: exact decode


def test_dataset_reports_over_budget_images(tmp_path):
    root = jpeg_tree(tmp_path / "i", n=3)
    Image.new("RGB", (300, 300)).save(next(root.iterdir()) / "wide.png")
    scan = scan_image_folder(root)
    ds = ImageFileDataset.for_model(root, scan.entries, TF, (3, 16, 16), max_decoded_bytes=100_000)
    items = [ds[i] for i in range(len(ds))]
    bad = [it for it in items if not it["ok"]]
    assert len(bad) == 1 and "over memory budget" in bad[0]["error"] and bad[0]["thumb"] == b""


def test_frozen_features_match_eager_and_untraceable_models_stay_eager():
    bundle = TinyBundle()
    bundle.network = bundle.body
    x = torch.randn(3, 3, 16, 16)
    frozen = prepare_features(bundle, x[:2], channels_last=True, freeze=True)
    assert isinstance(frozen, torch.jit.ScriptModule)
    torch.testing.assert_close(frozen(x.contiguous(memory_format=torch.channels_last)), bundle.features(x))

    class Odd(TinyBundle):
        def features(self, x):
            return self.body(x) if float(x.sum()) > -1e9 else x  # data-dependent Python: not traceable as is

    odd = Odd()
    odd.network = odd.body
    f = prepare_features(odd, x[:2], channels_last=False, freeze=True)
    torch.testing.assert_close(f(x), odd.features(x))


def test_gpu_decode_is_ignored_without_cuda_and_its_cpu_fallback_works(tmp_path):
    from oodcore.extraction.gpudecode import decode_batch
    from oodcore.extraction.passes import _collate

    root = jpeg_tree(tmp_path / "i", n=4, bad=(2,))
    scan = scan_image_folder(root)
    ds = ImageFileDataset.for_model(root, scan.entries, TF, (3, 16, 16), gpu_decode=True)
    assert ds.gpu_decode == torch.cuda.is_available()
    # the decode path itself, run with torchvision's CPU decoder standing in for the GPU's
    pil, mean, std, _ = split_transform(TF)
    forced = ImageFileDataset(
        root, scan.entries, pil, image_shape=(3, 16, 16), uint8=True, thumb_jpeg=True, gpu_decode=True
    )
    batch = _collate([forced[i] for i in range(4)])
    good = ["im002" not in e.relpath for e in scan.entries]
    assert [bool(r) for r in batch["raw"]] == good  # a damaged file goes the CPU way
    decode_batch(batch, forced, torch.device("cpu"))
    ref = [ds[i] for i in range(4)] if not ds.gpu_decode else [forced._item(i) for i in range(4)]
    assert batch["ok"].tolist() == [r["ok"] for r in ref] == good
    assert "im002" in batch["error"][good.index(False)]
    for k in [k for k, g in enumerate(good) if g]:  # another decoder and resampler: close to PIL's, not equal
        diff = (batch["image"][k].int() - ref[k]["image"].int()).abs().float().mean()
        assert diff < 8, diff
        assert Image.open(io.BytesIO(batch["thumb"][k])).size == (64, 64)


def test_odin_gradient_signs_share_one_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 7)).double()
    model.requires_grad_(False)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    temps = (1.0, 10.0, 1000.0)
    signs, logits = gradient_signs(model, x, temps)
    for t, s in zip(temps, signs):
        ref_sign, ref_logits = gradient_sign(model, x, t)
        assert torch.equal(s, ref_sign) and torch.equal(logits, ref_logits)


def test_make_tree_png_dataset_still_takes_the_float_path(tmp_path):
    root = make_tree(tmp_path / "p", n=3)
    scan = scan_image_folder(root)
    ds = ImageFileDataset.for_model(root, scan.entries, lambda img: torch.zeros(3, 4, 4), (3, 4, 4))
    assert not ds.uint8 and ds.mean is None and ds[0]["image"].dtype == torch.float32


BENCH_KEYS = {
    "machine",
    "extraction_ratio",
    "odin_ratio",
    "methods_seconds_52k",
    "methods_seconds_52k_cold",
    "per_method_seconds",
    "slider_seconds_52k",
    "cold_start_seconds",
    "extract_peak_rss_mb",
}


def test_bench_json_keys_are_stable():
    from oodcore.cli.bench import stable_keys

    full = stable_keys(
        {
            "machine": {"cores": 2},
            "extraction": {"ratio": 1.4},
            "odin": {"ratio": 2.6},
            "methods_seconds_52k": 9.0,
            "per_method_seconds": {"msp": 0.1},
            "slider_seconds_52k": {"msp": 0.05},
            "cold_start": {"seconds": 2.5},
            "rss": {"extract_peak_rss_mb": {"2000": 700.0}},
        }
    )
    assert set(full) == BENCH_KEYS and full["extraction_ratio"] == 1.4 and full["cold_start_seconds"] == 2.5
    empty = stable_keys({"machine": {}})
    assert set(empty) == BENCH_KEYS and empty["odin_ratio"] is None and empty["extract_peak_rss_mb"] is None


def test_cold_start_bench_says_why_when_it_cannot_run(monkeypatch, tmp_path):
    from oodcore.cli import bench_app

    monkeypatch.setattr(bench_app, "CHROMIUM", tmp_path / "no-chromium")
    out = bench_app.bench_cold_start()
    assert out["seconds"] is None and "chromium" in out["note"]
