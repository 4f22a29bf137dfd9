"""The torch Dataset over scanned image files: decode, preprocess, thumbnail; a bad file becomes a reported row.

Fast path (``uint8=True``, used by extraction): the worker only decodes (optionally in JPEG draft mode when the
image is at least twice the resize target), resizes and crops, and hands over a uint8 tensor; the
float conversion and normalisation run once per batch in the main process (`normalise_batch`), which
gives bit-identical inputs to torchvision's ToTensor + Normalize at a quarter of the transfer size.
The thumbnail is cut from the same decoded image and, with ``thumb_jpeg=True``, JPEG-encoded in the worker.
"""

from __future__ import annotations

import io
import os
from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from oodcore.data.folders import FileEntry
from oodcore.data.images import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    BadImageError,
    load_rgb,
    make_thumbnail,
)
from oodcore.store.thumbs import encode_one


def split_transform(transform: Callable) -> tuple[Callable, tuple, tuple, int | None] | None:
    """Split a torchvision eval pipeline [PIL ops..., ToTensor, Normalize] into its PIL part, mean, std
    and the shorter side its first Resize targets; None when the transform has another shape."""
    from torchvision import transforms as T

    ops = list(getattr(transform, "transforms", []))
    if len(ops) < 3 or not isinstance(ops[-1], T.Normalize) or ops[-1].inplace:
        return None
    if type(ops[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    pil_ops = ops[:-2]
    if not all(isinstance(op, (T.Resize, T.CenterCrop)) for op in pil_ops):
        return None
    mean = tuple(float(m) for m in torch.as_tensor(ops[-1].mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(ops[-1].std).flatten())
    target = None
    first = pil_ops[0] if pil_ops else None
    if isinstance(first, T.Resize) and first.max_size is None:
        size = first.size
        if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
            target = int(size if isinstance(size, int) else size[0])
    return T.Compose(pil_ops), mean, std, target


def normalise_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised, exactly as ToTensor + Normalize compute it per image."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.to(torch.float32).div_(255).sub_(m).div_(s)


class ImageFileDataset(Dataset):
    """Images of a scanned folder; a bad image is reported via ``ok``/``error``, never raised.

    ``transform`` maps an RGB PIL image to a float tensor of ``image_shape``; bad images get
    zeros of that shape so a batch still collates. Picklable (for ``num_workers > 0``)
    as long as ``transform`` is (torchvision transforms are; avoid lambdas).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        entries: Sequence[FileEntry],
        transform: Callable,
        thumb_size: int = 64,
        image_shape: tuple[int, ...] = (3, 224, 224),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        *,
        uint8: bool = False,
        target_side: int | None = None,
        thumb_jpeg: bool = False,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
        gpu_decode: bool = False,
    ):
        if transform is None or not callable(transform):
            raise TypeError("transform must be a callable mapping a PIL image to a tensor")
        if thumb_size <= 0:
            raise ValueError("thumb_size must be positive")
        self.root = str(root)
        self.entries = tuple(entries)
        self.transform = transform
        self.thumb_size = int(thumb_size)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.max_pixels = int(max_pixels)
        self.uint8 = bool(uint8)
        self.target_side = None if target_side is None else int(target_side)
        self.thumb_jpeg = bool(thumb_jpeg)
        self.max_decoded_bytes = int(max_decoded_bytes)
        self.gpu_decode = bool(gpu_decode) and self.uint8 and self.thumb_jpeg

    @classmethod
    def for_model(
        cls,
        root,
        entries: Sequence[FileEntry],
        transform: Callable,
        image_shape,
        *,
        draft: bool = False,
        gpu_decode: bool = False,
        **kw,
    ) -> "ImageFileDataset":
        """The fast path when `transform` is a plain [Resize, CenterCrop, ToTensor, Normalize] pipeline
        (uint8 batches, JPEG thumbnails from the workers); else the float path.
        ``mean``/``std`` for `normalise_batch` are on the returned dataset (None on the float path).
        ``draft``: decode JPEGs at least twice the resize target in libjpeg's draft mode (less work,
        but those images' pixels, hence logits, change: off by default, see the README)."""
        parts = split_transform(transform)
        if parts is None:
            ds = cls(root, entries, transform, image_shape=image_shape, thumb_jpeg=True, **kw)
            ds.mean = ds.std = None
            return ds
        pil, mean, std, target = parts
        target = target if draft else None
        gpu = gpu_decode and torch.cuda.is_available()
        ds = cls(
            root,
            entries,
            pil,
            image_shape=image_shape,
            uint8=True,
            target_side=target,
            thumb_jpeg=True,
            gpu_decode=gpu,
            **kw,
        )
        ds.mean, ds.std = mean, std
        return ds

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, i: int) -> str:
        return os.path.join(self.root, *self.entries[i].relpath.split("/"))

    def __getitem__(self, i: int) -> dict:
        if self.gpu_decode:
            raw = self._raw_jpeg(i)
            item = self._item(i) if raw is None else self._placeholder(i)
            item["raw"] = raw or b""
            return item
        return self._item(i)

    def _raw_jpeg(self, i: int) -> bytes | None:
        """The file's bytes when it is a JPEG the GPU may decode within the budget; None: decode it here."""
        from PIL import Image

        try:
            with open(self.path(i), "rb") as fh:
                raw = fh.read()
            with Image.open(io.BytesIO(raw)) as img:
                w, h = img.size
                if img.format != "JPEG" or w * h > self.max_pixels or w * h * 3 > self.max_decoded_bytes:
                    return None
            return raw
        except Exception:  # let the CPU path give the reason
            return None

    def _placeholder(self, i: int) -> dict:
        return {
            "image": torch.zeros(self.image_shape, dtype=torch.uint8),
            "thumb": b"",
            "ok": True,
            "error": "",
            "index": i,
        }

    def _item(self, i: int) -> dict:
        ts = self.thumb_size
        try:
            img = load_rgb(
                self.path(i),
                max_pixels=self.max_pixels,
                target_side=self.target_side,
                max_decoded_bytes=self.max_decoded_bytes,
            )
        except BadImageError as e:
            return self._bad(i, str(e))
        except Exception as e:  # anything else PIL or the OS throws: still a per-file problem
            return self._bad(i, f"unreadable: {type(e).__name__}: {e}")
        try:
            thumb = make_thumbnail(img, ts)
            thumb = encode_one(thumb) if self.thumb_jpeg else torch.from_numpy(thumb)
            image = self.transform(img)
            del img
            if self.uint8:  # PIL (H, W, C) uint8 -> (C, H, W), converted to float once per batch
                image = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        except Exception as e:
            return self._bad(i, f"transform failed: {type(e).__name__}: {e}")
        if not isinstance(image, torch.Tensor):
            image = torch.as_tensor(np.asarray(image))
        if tuple(image.shape) != self.image_shape:
            # A configuration error, not a bad file: fail loudly instead of marking all images bad.
            raise ValueError(
                f"transform produced shape {tuple(image.shape)} but image_shape={self.image_shape}; "
                "pass the transform's true output shape"
            )
        image = image if self.uint8 else image.to(torch.float32)
        return {"image": image, "thumb": thumb, "ok": True, "error": "", "index": i}

    def _bad(self, i: int, error: str) -> dict:
        bad = {
            "image": torch.zeros(self.image_shape, dtype=torch.uint8 if self.uint8 else torch.float32),
            "thumb": b"" if self.thumb_jpeg else torch.zeros((self.thumb_size, self.thumb_size, 3), dtype=torch.uint8),
            "ok": False,
            "error": f"{self.entries[i].relpath}: {error}",
            "index": i,
        }
        if self.gpu_decode:
            bad["raw"] = b""
        return bad
