"""Optional GPU JPEG decoding (nvJPEG through torchvision.io.decode_jpeg) for the extraction pass.

The workers hand over JPEG files undecoded (`ImageFileDataset(gpu_decode=True)`); here a batch's
files are decoded on the GPU in one call, resized and cropped there by the model's own Resize and
CenterCrop (their tensor path), and thumbnailed there too. Any file the GPU cannot decode (CMYK,
progressive oddities, damage) is decoded on the CPU instead, so the result and the skipped list are
those of the CPU path. The GPU's IDCT and resampler are not PIL's: pixels differ slightly from a
CPU decode, so runs that use it are keyed apart (see oodcore.extraction.runner).
"""

from __future__ import annotations

import numpy as np
import torch

from oodcore.store.thumbs import encode_one


def _thumb(img: torch.Tensor, size: int) -> bytes:
    """make_thumbnail's geometry on a (3, H, W) uint8 tensor: shorter side -> size (bilinear), centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    small = F.center_crop(F.resize(img, size, InterpolationMode.BILINEAR, antialias=True), [size, size])
    return encode_one(small.permute(1, 2, 0).cpu().numpy().astype(np.uint8))


def decode_batch(batch: dict, dataset, device: torch.device) -> None:
    """Fill the rows of `batch` whose `raw` holds JPEG bytes: image (on `device`), thumb, ok, error."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raws = batch["raw"]
    rows = [k for k, r in enumerate(raws) if r]
    x = batch["image"].to(device, non_blocking=True)
    thumbs = list(batch["thumb"])
    ok, errors = batch["ok"].clone(), list(batch["error"])
    decoded: list = [None] * len(rows)
    if rows:
        data = [torch.frombuffer(bytearray(raws[k]), dtype=torch.uint8) for k in rows]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except Exception:  # one bad file fails the batched call: decode one by one
            for n, d in enumerate(data):
                try:
                    decoded[n] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
                except Exception:
                    decoded[n] = None
    for k, img in zip(rows, decoded):
        if img is not None:
            x[k] = dataset.transform(img)
            thumbs[k] = _thumb(img, dataset.thumb_size)
            continue
        item = dataset._item(int(batch["index"][k]))  # the CPU path decides: an image or a reason
        x[k] = item["image"].to(device)
        thumbs[k], ok[k], errors[k] = item["thumb"], item["ok"], item["error"]
    batch["image"], batch["thumb"], batch["ok"], batch["error"] = x, thumbs, ok, errors
