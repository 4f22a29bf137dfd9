"""Data layer: class metadata, robust image loading, folder scanning, protocols."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from oodcore.data.dataset import ImageFileDataset
from oodcore.data.folders import (
    DatasetError,
    FileEntry,
    fingerprint,
    resolve_root,
    scan_image_folder,
)
from oodcore.data.imagenet import (
    class_name,
    imagenet_names,
    imagenet_wnids,
    wnid_to_index,
)
from oodcore.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    is_image_file,
    load_rgb,
    make_thumbnail,
)
from oodcore.data.protocols import (
    PROTOCOL_DESCRIPTIONS,
    PROTOCOLS,
    build_protocol,
    stratified_subset,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WN = imagenet_wnids()


# ---------------------------------------------------------------- helpers


def _noise(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _save(path: Path, img: Image.Image | None = None, fmt: str | None = None, seed: int = 0, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or _noise(seed=seed)).save(path, format=fmt, **kw)
    return path


def _tree(root: Path, spec: dict[str, int], ext: str = "png", seed: int = 0) -> Path:
    """Create root/<wnid>/<wnid>_<k>.<ext> with spec[wnid] images each."""
    for j, (w, n) in enumerate(spec.items()):
        for k in range(n):
            _save(root / w / f"{w}_{k}.{ext}", seed=seed + 100 * j + k)
    return root


def _bomb_png(path: Path, w: int = 100_000, h: int = 100_000) -> Path:
    """A PNG whose header claims w x h pixels but carries no pixel data (costs ~50 bytes)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


TF = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
SHAPE = (3, 32, 32)


# ---------------------------------------------------------------- imagenet_classes


def test_imagenet_classes_metadata():
    w = imagenet_wnids()
    assert len(w) == 1000 and len(set(w)) == 1000 and w == sorted(w)
    names = imagenet_names()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    assert class_name("n01440764") == "tench"
    idx = wnid_to_index()
    assert idx["n01440764"] == 0 and idx[w[-1]] == 999
    idx["x"] = 5  # callers get a copy
    assert "x" not in wnid_to_index()
    with pytest.raises(KeyError, match="not an ImageNet-1K wnid"):
        class_name("n99999999")


def test_imagenet_order_matches_shared_list():
    f = SHARED / "imagenet-wnids.txt"
    if not f.is_file():
        pytest.skip("../shared/imagenet-wnids.txt is absent")
    assert imagenet_wnids() == f.read_text().split()


# ---------------------------------------------------------------- image_io


def test_extensions_case_insensitive():
    for ext in ("jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff", "ppm"):
        assert "." + ext in IMAGE_EXTENSIONS
        assert is_image_file(f"a/b.{ext.upper()}") and is_image_file(f"b.{ext}")
    assert not is_image_file("x.txt") and not is_image_file("noext")


@pytest.mark.parametrize(
    "mode,ext",
    [
        ("L", "png"),
        ("1", "png"),
        ("P", "png"),
        ("RGBA", "png"),
        ("LA", "png"),
        ("CMYK", "jpg"),
        ("L", "jpg"),
        ("RGB", "bmp"),
        ("RGB", "webp"),
        ("P", "gif"),
        ("RGB", "tiff"),
        ("RGB", "ppm"),
    ],
)
def test_modes_load_as_rgb(tmp_path, mode, ext):
    p = _save(tmp_path / f"x.{ext}", _noise().convert(mode))
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.asarray(img).shape == (30, 40, 3)


def test_alpha_composited_on_white_and_palette_transparency(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    a = np.asarray(load_rgb(_save(tmp_path / "a.png", rgba)))
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[4, 4]) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    p = _save(tmp_path / "p.png", pal, transparency=0)
    b = np.asarray(load_rgb(p))
    assert tuple(b[0, 0]) == (255, 255, 255) and tuple(b[1, 1]) == (0, 255, 0)


def test_16bit_png_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    im16 = Image.fromarray(arr)
    assert im16.mode.startswith("I;16")
    p = _save(tmp_path / "g16.png", im16)
    a = np.asarray(load_rgb(p))
    assert a.shape == (1, 3, 3)
    assert list(a[0, :, 0]) == [0, 128, 255] and (a[..., 0] == a[..., 2]).all()


def test_cmyk_jpeg_colours(tmp_path):
    p = _save(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))
    r, g, b = np.asarray(load_rgb(p))[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60  # pure red, not an inverted colour


def test_exif_orientation_applied(tmp_path):
    img = _noise((40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = _save(tmp_path / "o.jpg", img, exif=exif.tobytes())
    assert load_rgb(p).size == (20, 40)


def test_file_object_input(tmp_path):
    buf = io.BytesIO()
    _noise().save(buf, format="PNG")
    buf.seek(0)
    assert load_rgb(buf).size == (40, 30)
    with pytest.raises(BadImageError, match="zero-byte"):
        load_rgb(io.BytesIO(b""))


def test_bad_files_raise_bad_image_error(tmp_path):
    z = tmp_path / "z.jpg"
    z.write_bytes(b"")
    with pytest.raises(BadImageError) as e:
        load_rgb(z)
    assert e.value.reason == "zero-byte file"

    t = tmp_path / "t.jpg"
    t.write_text("<html>not really a jpeg</html>")
    with pytest.raises(BadImageError) as e:
        load_rgb(t)
    assert e.value.reason == "not an image"

    full = _save(tmp_path / "full.jpg", _noise((128, 128)), quality=95).read_bytes()
    tr = tmp_path / "tr.jpg"
    tr.write_bytes(full[: len(full) // 2])
    with pytest.raises(BadImageError) as e:
        load_rgb(tr)
    assert e.value.reason == "truncated"

    fullp = _save(tmp_path / "full.png", _noise((128, 128))).read_bytes()
    trp = tmp_path / "tr.png"
    trp.write_bytes(fullp[: len(fullp) // 2])
    with pytest.raises(BadImageError) as e:
        load_rgb(trp)
    assert e.value.reason in ("truncated", "corrupt")

    with pytest.raises(BadImageError) as e:
        load_rgb(tmp_path / "missing.jpg")
    assert e.value.reason == "missing file"

    # pickles (reported from DataLoader workers)
    err = pickle.loads(pickle.dumps(BadImageError("truncated", "x")))
    assert err.reason == "truncated" and str(err) == "truncated: x"


def test_decompression_bomb(tmp_path):
    # header claims 10^10 pixels: rejected before any pixel memory is allocated
    with pytest.raises(BadImageError) as e:
        load_rgb(_bomb_png(tmp_path / "bomb.png"))
    assert e.value.reason == "decompression bomb"
    # explicit per-call limit
    p = _save(tmp_path / "small.png", _noise((20, 20)))
    with pytest.raises(BadImageError, match="decompression bomb.*exceeds the limit of 100 pixels"):
        load_rgb(p, max_pixels=100)
    assert load_rgb(p, max_pixels=400).size == (20, 20)


def test_explicit_limit_beats_pil_global_limit(tmp_path, monkeypatch):
    # PIL's process-wide limit (here absurdly low) neither rejects what max_pixels allows nor changes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    p = _save(tmp_path / "small.png", _noise((20, 20)))
    assert load_rgb(p, max_pixels=1000).size == (20, 20)
    assert load_rgb(p).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(p, max_pixels=399)


def test_large_jpeg_uses_draft(tmp_path):
    p = _save(tmp_path / "big.jpg", _noise((512, 384)))
    assert load_rgb(p).size == (512, 384)  # below the threshold: exact decode
    img = load_rgb(p, draft_above_pixels=1000, draft_min_side=64)
    assert img.mode == "RGB" and img.size == (128, 96)  # 1/4 DCT scale keeps shorter side >= 64


def test_make_thumbnail_center_crop():
    a = np.zeros((50, 150, 3), np.uint8)
    a[:, 50:100] = (0, 0, 255)  # blue centre third, red-free sides
    t = make_thumbnail(Image.fromarray(a), 16)
    assert t.shape == (16, 16, 3) and t.dtype == np.uint8
    assert (t[:, 2:-2, 2] > 200).all()  # the crop is the centre
    assert make_thumbnail(Image.new("L", (10, 300)), 64).shape == (64, 64, 3)


# ---------------------------------------------------------------- resolve_root / scan


def test_resolve_root_layouts_and_errors(tmp_path):
    plain = _tree(tmp_path / "plain", {WN[0]: 1})
    assert resolve_root(plain) == plain
    tv = _tree(tmp_path / "tv" / "val", {WN[0]: 1}).parent
    (tv / "meta.bin").write_bytes(b"\x80not-to-be-read")
    assert resolve_root(tv) == tv / "val"

    with pytest.raises(DatasetError, match="does not exist"):
        resolve_root(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        resolve_root(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        resolve_root(tmp_path / "empty")
    flat = tmp_path / "flat"
    _save(flat / "a.jpg")
    (flat / "cats").mkdir()
    with pytest.raises(DatasetError, match=r"no class sub-folders named by wnid.*1 image file"):
        resolve_root(flat)
    unsorted_val = tmp_path / "tv2" / "val"
    _save(unsorted_val / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetError, match="unsorted"):
        resolve_root(tmp_path / "tv2")
    noimg = tmp_path / "noimg"
    (noimg / WN[3]).mkdir(parents=True)
    (noimg / WN[3] / "notes.txt").write_text("x")
    assert resolve_root(noimg) == noimg
    with pytest.raises(DatasetError, match="no images found.*1 non-image"):
        scan_image_folder(noimg)


def test_scan_sorted_ignored_and_reported(tmp_path):
    root = _tree(tmp_path / "d", {WN[7]: 2, WN[2]: 2})
    (root / WN[2] / "readme.txt").write_text("x")
    (root / WN[2] / ".DS_Store").write_bytes(b"x")
    (root / WN[2] / "._a.jpg").write_bytes(b"appledouble")
    (root / "LOC_val_solution.csv").write_text("x")
    (root / "__MACOSX").mkdir()
    _save(root / WN[7] / "sub" / "deep.JPEG", fmt="JPEG")
    res = scan_image_folder(root)
    rels = [e.relpath for e in res.entries]
    assert rels == sorted(rels) and len(rels) == 5
    assert f"{WN[7]}/sub/deep.JPEG" in rels
    assert all(e.wnid == e.relpath.split("/")[0] for e in res.entries)
    assert all("\\" not in r for r in rels)
    assert set(res.ignored) == {
        f"{WN[2]}/readme.txt",
        f"{WN[2]}/.DS_Store",
        f"{WN[2]}/._a.jpg",
        "LOC_val_solution.csv",
        "__MACOSX/",
    }
    assert res.class_wnids == sorted([WN[2], WN[7]]) and res.root == root
    e = res.entries[0]
    st = os.stat(root / e.relpath)
    assert (e.size, e.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_scan_non_imagenet_wnid_folder(tmp_path):
    root = _tree(tmp_path / "d", {WN[0]: 1, "n99999999": 1})
    with pytest.raises(DatasetError, match="not ImageNet-1K classes: n99999999"):
        scan_image_folder(root)
    res = scan_image_folder(root, strict_wnids=False)
    assert res.non_imagenet_wnids == ["n99999999"] and len(res.entries) == 2


def test_fingerprint_tracks_changes(tmp_path):
    root = _tree(tmp_path / "d", {WN[0]: 2, WN[1]: 1})
    fp0 = fingerprint(scan_image_folder(root).entries)
    assert fp0 == fingerprint(scan_image_folder(root).entries) and len(fp0) == 64
    p = next((root / WN[0]).iterdir())
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fp1 = fingerprint(scan_image_folder(root).entries)
    assert fp1 != fp0
    mtime = os.stat(p).st_mtime_ns
    with open(p, "ab") as f:
        f.write(b"\0")
    os.utime(p, ns=(mtime, mtime))  # same mtime, new size
    fp2 = fingerprint(scan_image_folder(root).entries)
    assert fp2 not in (fp0, fp1)
    _save(root / WN[1] / "new.png")
    fp3 = fingerprint(scan_image_folder(root).entries)
    assert fp3 not in (fp0, fp1, fp2)
    (root / WN[1] / "new.png").unlink()
    assert fingerprint(scan_image_folder(root).entries) == fp2
    e = FileEntry("a/b.png", "a", 1, 2)
    assert fingerprint([e]) != fingerprint([FileEntry("a/b.png", "a", 1, 3)])


# ---------------------------------------------------------------- ImageFileDataset


def _messy_tree(root: Path) -> Path:
    w = WN[10]
    d = root / w
    _save(d / "good.jpg")
    _save(d / "gray.png", _noise().convert("L"))
    _save(d / "cmyk.jpg", _noise().convert("CMYK"))
    _save(d / "pal.png", _noise().convert("P"))
    _save(d / "rgba.png", _noise().convert("RGBA"))
    _save(d / "g16.png", Image.fromarray((np.arange(1200, dtype=np.uint16) * 50).reshape(30, 40)))
    (d / "zero.jpg").write_bytes(b"")
    full = _save(d / "tmp.jpg", _noise((128, 128), seed=3)).read_bytes()
    (d / "tmp.jpg").unlink()
    (d / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (d / "text.jpg").write_text("this is text")
    _bomb_png(d / "bomb.png")
    return root


EXPECTED_BAD = {
    "zero.jpg": "zero-byte",
    "trunc.jpg": "truncated",
    "text.jpg": "not an image",
    "bomb.png": "decompression bomb",
}


def _check_items(items, entries):
    assert len(items) == len(entries)
    for it in items:
        name = entries[it["index"]].relpath.rsplit("/", 1)[-1]
        if name in EXPECTED_BAD:
            assert it["ok"] is False and EXPECTED_BAD[name] in it["error"], (name, it["error"])
            assert name in it["error"]
            assert not it["image"].any() and not it["thumb"].any()
        else:
            assert it["ok"] is True and it["error"] == "", (name, it["error"])
        assert tuple(it["image"].shape) == SHAPE and it["image"].dtype == torch.float32
        assert tuple(it["thumb"].shape) == (16, 16, 3) and it["thumb"].dtype == torch.uint8


def test_dataset_reports_bad_images(tmp_path):
    root = _messy_tree(tmp_path / "m")
    res = scan_image_folder(root)
    assert len(res.entries) == 10
    ds = ImageFileDataset(res.root, res.entries, TF, thumb_size=16, image_shape=SHAPE)
    items = [ds[i] for i in range(len(ds))]
    _check_items(items, res.entries)
    assert sum(it["ok"] for it in items) == 6
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2[0]["index"] == 0


def test_dataset_through_dataloader_workers(tmp_path):
    root = _messy_tree(tmp_path / "m")
    res = scan_image_folder(root)
    ds = ImageFileDataset(res.root, res.entries, TF, thumb_size=16, image_shape=SHAPE)
    dl = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    items = []
    for b in dl:
        assert b["image"].shape[1:] == SHAPE and b["ok"].dtype == torch.bool
        for j in range(len(b["index"])):
            items.append({k: (v[j] if not isinstance(v, torch.Tensor) or v.ndim == 0 else v[j]) for k, v in b.items()})
    for it in items:
        it["ok"] = bool(it["ok"])
        it["index"] = int(it["index"])
    assert [it["index"] for it in items] == list(range(len(ds)))
    _check_items(items, res.entries)


def test_dataset_shape_mismatch_is_a_config_error(tmp_path):
    res = scan_image_folder(_tree(tmp_path / "d", {WN[0]: 1}))
    ds = ImageFileDataset(res.root, res.entries, TF, image_shape=(3, 224, 224))
    with pytest.raises(ValueError, match="image_shape"):
        ds[0]


# ---------------------------------------------------------------- protocols

ID_SPEC = {WN[999]: 3, WN[0]: 3, WN[5]: 3, WN[10]: 3, WN[20]: 3, WN[500]: 3}
OOD_SPEC = {WN[999]: 2, WN[5]: 2, WN[20]: 2}


@pytest.fixture
def trees(tmp_path):
    idr = _tree(tmp_path / "imagenet" / "val", ID_SPEC, ext="JPEG").parent  # torchvision-style root
    (idr / "val" / WN[0] / "info.txt").write_text("x")
    ood = _tree(tmp_path / "imagenet-o", OOD_SPEC, ext="jpg", seed=1000)
    other = _tree(tmp_path / "other", {WN[1]: 2, WN[2]: 1}, seed=2000)
    return idr, ood, other


def test_protocol_imagenet_o(trees):
    idr, ood, _ = trees
    spec = build_protocol(idr, ood, "imagenet-o")
    assert spec.class_wnids == [WN[5], WN[20], WN[999]]
    assert spec.class_indices.tolist() == [5, 20, 999] and spec.class_indices.dtype == np.int64
    assert spec.id_root == idr / "val" and spec.ood_root == ood
    assert len(spec.id_files) == 9 and len(spec.ood_files) == 6
    assert spec.id_labels.dtype == np.int64
    assert [spec.class_wnids[lab] for lab in spec.id_labels] == [e.wnid for e in spec.id_files]
    assert [e.relpath for e in spec.id_files] == sorted(e.relpath for e in spec.id_files)
    assert spec.ignored == [f"{(idr / 'val').as_posix()}/{WN[0]}/info.txt"]
    j = json.loads(json.dumps(spec.to_json()))
    assert j["name"] == "imagenet-o" and j["n_classes"] == 3 and j["n_id"] == 9 and j["n_ood"] == 6
    assert j["class_wnids"] == spec.class_wnids and len(j["id_fingerprint"]) == 64


def test_protocol_full(trees):
    idr, ood, _ = trees
    spec = build_protocol(idr, ood, "full")
    assert spec.class_wnids == WN and spec.class_indices.tolist() == list(range(1000))
    assert len(spec.id_files) == 18 and len(spec.ood_files) == 6
    w2i = wnid_to_index()
    assert spec.id_labels.tolist() == [w2i[e.wnid] for e in spec.id_files]


def test_protocol_id_classes(trees):
    idr, ood, other = trees
    spec = build_protocol(idr, other, "id-classes")
    assert spec.class_wnids == sorted(ID_SPEC) and spec.class_indices.tolist() == [0, 5, 10, 20, 500, 999]
    assert len(spec.id_files) == 18 and len(spec.ood_files) == 3
    assert [spec.class_wnids[lab] for lab in spec.id_labels] == [e.wnid for e in spec.id_files]
    assert not any("also ID classes" in n for n in spec.notes)
    overl = build_protocol(idr, ood, "id-classes")  # overlap allowed, reported
    assert any("3 OOD class folder(s) are also ID classes" in n for n in overl.notes)


def test_protocol_errors(trees, tmp_path):
    idr, ood, other = trees
    assert set(PROTOCOLS) == set(PROTOCOL_DESCRIPTIONS) == {"imagenet-o", "full", "id-classes"}
    with pytest.raises(DatasetError, match="unknown protocol"):
        build_protocol(idr, ood, "imagenet-a")
    with pytest.raises(DatasetError, match="has no image of the OOD folder's 2 classes"):
        build_protocol(idr, other, "imagenet-o")
    with pytest.raises(DatasetError, match="does not exist"):
        build_protocol(tmp_path / "missing", ood, "full")
    with pytest.raises(DatasetError, match="limit"):
        build_protocol(idr, ood, "full", limit=0)
    odd = _tree(tmp_path / "odd", {"n99999999": 1})
    with pytest.raises(DatasetError, match="not ImageNet-1K"):
        build_protocol(idr, odd, "imagenet-o")
    spec = build_protocol(idr, odd, "full")  # fine where the OOD folders do not form the mask
    assert len(spec.ood_files) == 1 and any("outside ImageNet-1K" in n for n in spec.notes)


def test_ood_list_exclude_and_keep(trees, tmp_path):
    idr, ood, _ = trees
    lst = tmp_path / "list.txt"
    lst.write_text(
        "# cleaned ImageNet-O: drop these\n\n"
        f"{WN[5]}/{WN[5]}_0.jpg\n"
        f"imagenet-o/{WN[20]}/{WN[20]}_1.jpg   # with a folder prefix\n"
        f"{WN[999]}_0.jpg\n"
        "does_not_exist.jpg\n"
    )
    spec = build_protocol(idr, ood, "imagenet-o", ood_list=lst)
    assert sorted(spec.excluded) == sorted(
        [f"{WN[5]}/{WN[5]}_0.jpg", f"{WN[20]}/{WN[20]}_1.jpg", f"{WN[999]}/{WN[999]}_0.jpg"]
    )
    assert len(spec.ood_files) == 3 and not set(spec.excluded) & {e.relpath for e in spec.ood_files}
    assert any("1 of 4 entries matched no OOD file: does_not_exist.jpg" in n for n in spec.notes)
    assert spec.class_wnids == [WN[5], WN[20], WN[999]]  # the mask ignores the list

    keep = build_protocol(idr, ood, "imagenet-o", ood_list=lst, ood_list_mode="keep")
    assert sorted(e.relpath for e in keep.ood_files) == sorted(spec.excluded)
    assert len(keep.excluded) == 3 and keep.class_wnids == spec.class_wnids

    none = tmp_path / "none.txt"
    none.write_text("nothing.jpg\n")
    with pytest.raises(DatasetError, match="no OOD images left.*keep"):
        build_protocol(idr, ood, "imagenet-o", ood_list=none, ood_list_mode="keep")
    with pytest.raises(DatasetError, match="OOD list file not found"):
        build_protocol(idr, ood, "imagenet-o", ood_list=tmp_path / "nolist.txt")
    with pytest.raises(DatasetError, match="ood_list_mode"):
        build_protocol(idr, ood, "imagenet-o", ood_list=lst, ood_list_mode="drop")


def test_limit_is_deterministic_and_stratified(trees):
    idr, ood, _ = trees
    a = build_protocol(idr, ood, "imagenet-o", limit=4, seed=0)
    b = build_protocol(idr, ood, "imagenet-o", limit=4, seed=0)
    assert [e.relpath for e in a.id_files] == [e.relpath for e in b.id_files]
    assert len(a.id_files) == 4 and len(a.ood_files) == 4
    assert {e.wnid for e in a.id_files} == set(a.class_wnids)  # every masked class represented
    assert {e.wnid for e in a.ood_files} == set(OOD_SPEC)
    assert [e.relpath for e in a.id_files] == sorted(e.relpath for e in a.id_files)
    assert [a.class_wnids[lab] for lab in a.id_labels] == [e.wnid for e in a.id_files]
    assert a.class_wnids == [WN[5], WN[20], WN[999]]
    big = build_protocol(idr, ood, "full", limit=1000)
    assert len(big.id_files) == 18 and len(big.ood_files) == 6
    seeds = {tuple(e.relpath for e in build_protocol(idr, ood, "full", limit=6, seed=s).id_files) for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    sub = stratified_subset(a.id_files, 3, seed=1)
    assert len(sub) == 3 and len({e.wnid for e in sub}) == 3


# ---------------------------------------------------------------- real images (../shared)


def test_shared_sample_imagenet_o(shared_dir, tmp_path):
    res = scan_image_folder(shared_dir / "imagenet-sample")
    assert len(res.entries) == 250 and len({e.wnid for e in res.entries}) == 250
    o_wnids = (shared_dir / "imagenet-o-wnids.txt").read_text().split()
    assert len(o_wnids) == 200
    src = shared_dir / "imagenet-sample" / res.entries[0].relpath
    ood = tmp_path / "imagenet-o"
    for w in o_wnids:  # an emulated ImageNet-O: every official folder, one symlinked image each
        (ood / w).mkdir(parents=True)
        (ood / w / f"{w}_ood.JPEG").symlink_to(src)
    spec = build_protocol(shared_dir / "imagenet-sample", ood, "imagenet-o")
    assert spec.class_wnids == sorted(o_wnids)
    w2i = wnid_to_index()
    assert spec.class_indices.tolist() == sorted(w2i[w] for w in o_wnids)
    expected_id = [e for e in res.entries if e.wnid in set(o_wnids)]
    assert [e.relpath for e in spec.id_files] == [e.relpath for e in expected_id] and expected_id
    assert [spec.class_wnids[lab] for lab in spec.id_labels] == [e.wnid for e in spec.id_files]
    assert len(spec.ood_files) == 200
    ds = ImageFileDataset(spec.id_root, spec.id_files[:4], TF, thumb_size=16, image_shape=SHAPE)
    assert all(ds[i]["ok"] for i in range(len(ds)))
