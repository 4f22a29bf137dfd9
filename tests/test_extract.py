"""The resumable chunked pass: good rows kept, bad files reported, a killed run resumes."""

import numpy as np
import pytest
import torch
from PIL import Image

from oodcore.data.dataset import ImageFileDataset
from oodcore.data.folders import scan_image_folder
from oodcore.data.imagenet import imagenet_wnids
from oodcore.extraction.passes import done_chunks, run_pass
from oodcore.extraction.pipeline import extract_split
from oodcore.store import thumbs


class TinyBundle:
    """A model adapter with the engine's interface (features, head, network, std)."""

    std = (0.5, 0.5, 0.5)

    def __init__(self):
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        ).eval()
        self.head = torch.nn.Linear(4, 1000).eval()

    def features(self, x):
        return self.body(x)

    def network(self, x):
        return self.head(self.body(x))


def transform(img):
    arr = np.asarray(img.resize((16, 16)), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5


def make_tree(root, n=10, bad=()):
    wnids = imagenet_wnids()[:2]
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / wnids[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.png"
        if i in bad:
            path.write_bytes(b"not an image at all")
        else:
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return root


def test_extract_keeps_good_rows_and_reports_bad(tmp_path):
    root = make_tree(tmp_path / "imgs", n=10, bad=(3, 7))
    scan = scan_image_folder(root)
    ds = ImageFileDataset(root, scan.entries, transform, thumb_size=16, image_shape=(3, 16, 16))
    paths = [e.relpath for e in scan.entries]
    model = TinyBundle()
    mask = np.array([5, 1, 700])
    out, skipped = extract_split(model, ds, paths, mask, tmp_path / "parts", batch_size=3, workers=0)
    assert len(out["logits"]) == 8 and out["logits"].shape[1] == 3
    assert sorted(s["path"].split("/")[1] for s in skipped) == ["img003.png", "img007.png"]
    assert all("not an image" in s["error"] for s in skipped)
    # rows line up with their files and with an independent forward pass
    for row, i in enumerate(out["index"]):
        x = ds[int(i)]["image"][None]
        with torch.no_grad():
            expected = model.network(x)[0, mask].numpy()
        np.testing.assert_allclose(out["logits"][row], expected, rtol=1e-5, atol=1e-6)
        assert out["paths"][row] == paths[i]
    assert np.asarray(thumbs.unpack_one(out["thumb_data"], out["thumb_offsets"], 0)).shape == (16, 16, 3)


def test_killed_pass_resumes_where_it_stopped(tmp_path):
    root = make_tree(tmp_path / "imgs", n=12)
    scan = scan_image_folder(root)
    ds = ImageFileDataset(root, scan.entries, transform, thumb_size=8, image_shape=(3, 16, 16))
    calls = []

    def process(batch):
        calls.extend(batch["index"].tolist())
        return {"mean": batch["image"].mean(dim=(1, 2, 3)).numpy()}

    parts = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        run_pass(ds, parts, process, batch_size=2, chunk_size=4, stop_after_chunks=2)
    assert done_chunks(parts) == {0, 4}
    first = list(calls)
    calls.clear()
    rows = run_pass(ds, parts, process, batch_size=2, chunk_size=4)
    assert first == list(range(8)) and calls == [8, 9, 10, 11]  # only the missing chunk is recomputed
    assert rows["index"].tolist() == list(range(12))
    expected = [ds[i]["image"].mean().item() for i in range(12)]
    np.testing.assert_allclose(rows["mean"], expected, rtol=1e-6)


def test_half_written_chunk_is_not_trusted(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / ".chunk-00000000.npz.abc.tmp").write_bytes(b"partial")
    assert done_chunks(parts) == set()


class FakeDist:
    """One rank of a torchrun group (the barrier is where the real ranks meet)."""

    def __init__(self, rank, world):
        self.rank, self.world, self.barriers = rank, world, 0

    @property
    def is_main(self):
        return self.rank == 0

    def owns(self, chunk_number):
        return chunk_number % self.world == self.rank

    def barrier(self):
        self.barriers += 1


def test_sharded_pass_each_rank_its_chunks_a_killed_rank_resumes_rank0_gathers(tmp_path):
    root = make_tree(tmp_path / "imgs", n=14)
    scan = scan_image_folder(root)
    ds = ImageFileDataset(root, scan.entries, transform, thumb_size=8, image_shape=(3, 16, 16))
    calls = []

    def process(batch):
        calls.extend(batch["index"].tolist())
        return {"mean": batch["image"].mean(dim=(1, 2, 3)).numpy()}

    single = run_pass(ds, tmp_path / "single", process, batch_size=2, chunk_size=4)
    calls.clear()
    parts = tmp_path / "parts"
    one = FakeDist(1, 2)
    assert run_pass(ds, parts, process, batch_size=2, chunk_size=4, dist=one) == {}  # only rank 0 gathers
    assert calls == [4, 5, 6, 7, 12, 13] and one.barriers == 1  # chunks 1 and 3, no padding, no duplicate
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # rank 0 killed after its first chunk
        run_pass(ds, parts, process, batch_size=2, chunk_size=4, dist=FakeDist(0, 2), stop_after_chunks=1)
    assert calls == [0, 1, 2, 3]
    calls.clear()
    rows = run_pass(ds, parts, process, batch_size=2, chunk_size=4, dist=FakeDist(0, 2))  # the same command again
    assert calls == [8, 9, 10, 11]  # only its missing chunk
    assert set(rows) == set(single)
    for key in rows:
        assert rows[key].tobytes() == single[key].tobytes(), key
