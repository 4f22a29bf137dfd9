"""The torch Dataset over scanned image files: decode, preprocess, thumbnail; a bad file becomes a reported row."""

from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from oodcore.data.folders import FileEntry
from oodcore.data.images import DEFAULT_MAX_PIXELS, BadImageError, load_rgb, make_thumbnail


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

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, i: int) -> str:
        return os.path.join(self.root, *self.entries[i].relpath.split("/"))

    def __getitem__(self, i: int) -> dict:
        ts = self.thumb_size
        try:
            img = load_rgb(self.path(i), max_pixels=self.max_pixels)
        except BadImageError as e:
            return self._bad(i, str(e))
        except Exception as e:  # anything else PIL or the OS throws: still a per-file problem
            return self._bad(i, f"unreadable: {type(e).__name__}: {e}")
        try:
            thumb = torch.from_numpy(make_thumbnail(img, ts))
            image = self.transform(img)
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
        return {"image": image.to(torch.float32), "thumb": thumb, "ok": True, "error": "", "index": i}

    def _bad(self, i: int, error: str) -> dict:
        return {
            "image": torch.zeros(self.image_shape, dtype=torch.float32),
            "thumb": torch.zeros((self.thumb_size, self.thumb_size, 3), dtype=torch.uint8),
            "ok": False,
            "error": f"{self.entries[i].relpath}: {error}",
            "index": i,
        }
