"""Pixels for the model: decode once into uint8 tensors, augment cheaply, normalise on the device."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from .data import to_rgb

# Train images are kept a little larger than the model's input so random crops have room.
TRAIN_MARGIN = 1.15


def resize_center_crop(image: Image.Image, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """Resizes the shorter side to size / crop_pct, centre-crops size x size -> uint8 CHW tensor."""
    image = to_rgb(image)
    scale = (size / crop_pct) / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _per_channel(values, device: torch.device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float32).view(1, -1, 1, 1)
    return _constant(tuple(float(v) for v in values), device)


@functools.lru_cache(maxsize=32)
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    # Made once per device: a fresh host-to-GPU copy in every training step would wait for the queue.
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalize(x: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW on the device -> float, normalised there (so the loader ships 4x fewer bytes).

    Args:
        x: uint8 images, N x 3 x H x W, on the device the model runs on.
        mean, std: per-channel values (sequences or tensors).
        channels_last: return channels-last memory (for CNNs: see ``models.prefers_channels_last``).
    """
    x = (x.float().div_(255) - _per_channel(mean, x.device)) / _per_channel(std, x.device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def decode_unique(split, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes each distinct image of a split once: (uint8 pixels of the distinct images, the index
    of each row's image among them). Rows are told apart by their stored bytes."""
    import hashlib
    import io

    import datasets

    refs = split.cast_column("image", datasets.Image(decode=False))["image"]
    first: dict = {}
    image_of = [first.setdefault(hashlib.sha1(r["bytes"]).digest() if r.get("bytes") else r["path"], len(first))
                for r in refs]
    rows = {k: i for i, k in reversed(list(enumerate(image_of)))}  # distinct image -> its first row
    pixels = []
    for k in range(len(first)):
        ref = refs[rows[k]]
        with Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"]) as img:
            pixels.append(resize_center_crop(img, size))
    stacked = torch.stack(pixels) if pixels else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return stacked, torch.tensor(image_of, dtype=torch.long)


class ImageTensors(torch.utils.data.Dataset):
    """A dataset split decoded once into one uint8 tensor; training never decodes files again."""

    def __init__(self, split, image_size: int, label_map: list[int], train: bool, labels: bool = True,
                 hflip: bool = True, images=None, crop: bool = True, shift: float = 0.0):
        """``train``: augmented (random resized crops where ``crop``, else random shifts of up to ``shift`` of the
        side where it is above 0, the border's pixels repeated into the gap; horizontal flips where ``hflip``);
        with none of them, the training images are what validation sees."""
        from torchvision.transforms import v2

        shift = 0.0 if crop else shift
        self.train = train and (crop or hflip or shift > 0)
        side = round(image_size * TRAIN_MARGIN) if self.train and crop else image_size
        images = [resize_center_crop(img, side) for img in (split["image"] if images is None else images)]
        self.pixels = torch.stack(images) if images else torch.empty(0, 3, side, side, dtype=torch.uint8)
        self.labels = torch.tensor([label_map[y] for y in split["label"]] if labels else [0] * len(images),
                                   dtype=torch.long)
        self.row_ids = list(range(len(self.labels)))
        steps = (([v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True)] if crop else [])
                 + ([v2.RandomCrop(image_size, padding=round(shift * image_size), padding_mode="edge")]
                    if shift > 0 else [])
                 + ([v2.RandomHorizontalFlip()] if hflip else []))
        self.augment = v2.Compose(steps) if steps else None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.pixels[i]
        return (self.augment(x) if self.train else x), self.labels[i]
