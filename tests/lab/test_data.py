"""Tests for the Fashion-MNIST loader, run against the real Debian-installed files."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import torch

from sliceout_lab.data import (
    ENV_VAR,
    FASHION_MNIST_CLASSES,
    FashionMNISTNotFoundError,
    load_fashion_mnist,
)


@pytest.fixture(autouse=True)
def _default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test the installed files, whatever the caller's environment points at."""
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize(("split", "n"), [("train", 60_000), ("test", 10_000)])
def test_real_split_shapes_ranges_and_balance(split: str, n: int) -> None:
    x, y = load_fashion_mnist(split)  # type: ignore[arg-type]
    assert x.shape == (n, 784)
    assert x.dtype == torch.float32
    assert y.shape == (n,)
    assert y.dtype == torch.int64
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    assert int(y.min()) == 0
    assert int(y.max()) == 9
    # Fashion-MNIST is exactly balanced: 6000 train / 1000 test images per class.
    counts = torch.bincount(y, minlength=10)
    assert counts.tolist() == [n // 10] * 10
    # Pixels are k/255 for integer k: the loader scales raw bytes, it does not normalise.
    assert torch.equal(torch.round(x[:100] * 255) / 255, x[:100])


def test_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_missing_root_raises_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FashionMNISTNotFoundError, match="scripts/setup.sh") as info:
        load_fashion_mnist("train", root=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path) in message
    assert isinstance(info.value, FileNotFoundError)


def test_env_var_replaces_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FashionMNISTNotFoundError, match=re.escape(str(tmp_path))):
        load_fashion_mnist("test")


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid")  # type: ignore[arg-type]


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + payload)


def test_small_synthetic_idx_roundtrip(tmp_path: Path) -> None:
    """The header parser honours the declared shape (here 3 images of 2x2 pixels)."""
    pixels = bytes([0, 255, 51, 102] * 3)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (3, 2, 2), pixels)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (3,), bytes([7, 0, 9]))
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 4)
    assert torch.allclose(x[0], torch.tensor([0.0, 1.0, 0.2, 0.4]))
    assert y.tolist() == [7, 0, 9]


def test_bad_magic_number_is_rejected(tmp_path: Path) -> None:
    # Labels and images swapped: the magic numbers do not match the expected kind.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x801, (3,), bytes(3))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (3,), bytes(3))
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("test", root=tmp_path)


def test_truncated_payload_is_rejected(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (3, 2, 2), bytes(10))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (3,), bytes(3))
    with pytest.raises(ValueError, match="payload"):
        load_fashion_mnist("test", root=tmp_path)
