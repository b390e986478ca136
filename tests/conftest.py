"""Shared test pieces: a tiny stand-in backbone and a tiny synthetic VOC set."""
import pytest
import torch
from torch import nn

from densessl.data import VOCSegmentation, ensure_synthetic_voc


class TinyBackbone(nn.Module):
    """Stand-in backbone: a fixed random patch embedding (8 px patches)."""

    patch_size, embed_dim = 8, 16

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, self.embed_dim, self.patch_size, self.patch_size)

    def forward_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(images)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(train, val) VOCSegmentation of 8 + 4 synthetic 64 px scenes."""
    root = ensure_synthetic_voc(tmp_path_factory.mktemp("voc") / "synthetic", n_train=8, n_val=4, size=64)
    return VOCSegmentation(root, "train"), VOCSegmentation(root, "val")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-tensor tests: faster, and far faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
