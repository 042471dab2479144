"""Fashion-MNIST loader that reads the Debian ``dataset-fashion-mnist`` files.

The project's machines cannot download data sets at run time, but Debian ships the full
Fashion-MNIST (60k train + 10k test) as the original gzip-compressed IDX files. This module parses
those files directly, so the paper's Fashion-MNIST experiment (Appendix F.1) can be run on real
data with nothing beyond ``torch``, ``numpy`` and the standard library. Nothing is cached on disk:
decoding the 26 MB training file takes well under a second.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FashionMNISTNotFoundError",
    "load_fashion_mnist",
]

#: Where ``apt-get install dataset-fashion-mnist`` puts the four IDX files.
DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: Environment variable that, when set, replaces the default root directory.
ENV_VAR = "SLICEOUT_FX_FASHION_MNIST"

#: Class names in label order (0..9), as published with the data set.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX magic number: two zero bytes, a type code (0x08 = unsigned byte), then the number of
# dimensions. Images are 3-D (N, rows, cols), labels 1-D (N,).
_IDX_UBYTE = 0x08
_IMAGES_MAGIC = (_IDX_UBYTE << 8) | 3  # 0x00000803 == 2051
_LABELS_MAGIC = (_IDX_UBYTE << 8) | 1  # 0x00000801 == 2049


class FashionMNISTNotFoundError(FileNotFoundError):
    """Raised when the Fashion-MNIST IDX files are not where we look for them."""


def _resolve_root(root: str | Path | None) -> Path:
    """Pick the data directory: explicit ``root``, else the environment variable, else default.

    The environment variable replaces the default location, so a user can redirect every caller
    that does not pass a root (demo, benchmarks, tests) without changing code; a caller that does
    pass one gets exactly what it asked for.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_FASHION_MNIST_ROOT


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Decode one gzip-compressed IDX file of unsigned bytes into an array of its declared shape."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(data) - header_len != count:
        raise ValueError(
            f"{path}: header declares shape {shape} ({count} bytes) but the payload has "
            f"{len(data) - header_len} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header_len).reshape(shape)


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split as tensors ready for the paper's MLP.

    Args:
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000 examples).
        root: directory holding the four ``*-idx*-ubyte.gz`` files. When ``None``, the
            ``SLICEOUT_FX_FASHION_MNIST`` environment variable is used if set, else
            ``/usr/share/datasets/fashion-mnist`` (where the Debian package installs them).

    Returns:
        ``(images, labels)``: images as float32 of shape ``(N, 784)`` scaled to ``[0, 1]``
        (flattened because the paper's MLP takes the 784 pixels directly, with no other
        transformation), labels as int64 of shape ``(N,)`` with values ``0..9``.

    Raises:
        FashionMNISTNotFoundError: if a file is missing (the message says how to install it).
        ValueError: if ``split`` is unknown or a file is not a valid IDX file.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _resolve_root(root)
    image_name, label_name = _FILES[split]
    image_path, label_path = base / image_name, base / label_name
    missing = [p for p in (image_path, label_path) if not p.is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise FashionMNISTNotFoundError(
            f"Fashion-MNIST {split} files not found: {names}. Install the data with "
            "`bash scripts/setup.sh` (from the repository root) or "
            "`apt-get install dataset-fashion-mnist`, or point the "
            f"{ENV_VAR} environment variable at a directory holding the IDX .gz files."
        )

    images = _read_idx(image_path, _IMAGES_MAGIC)
    labels = _read_idx(label_path, _LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")

    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
