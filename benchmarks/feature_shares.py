"""What do a backbone's patch tokens encode on the synthetic val split: class, colour or image?

For each run folder (or ``random_cnn`` / ``random_vit`` for an untrained backbone) it prints the share of
the tokens' variance that group means explain, for four groupings of the val tokens (L2-normalised,
PCA to 32 dimensions as the overclustering protocol, ignore-labelled tokens dropped):

* ``class``: the token's ground-truth class (what a segmentation needs);
* ``fg/bg``: object vs background;
* ``colour``: the mean RGB of the token's pixels, 4 levels per channel (64 bins). Every scene is
  painted with random colours of one palette, so colour says nothing about the class;
* ``image``: which image the token comes from.

A k-means on tokens whose variance is mostly colour finds colour regions, not classes: overclustering
at K = #classes stays below the background-only score however good the linear probe is.

    python benchmarks/feature_shares.py random_cnn runs/results_table/densecl_cnn/seed0 [--image-size 96]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor


def explained_share(x: Tensor, groups: Tensor) -> float:
    """x (T, D), groups (T,) int -> between-group sum of squares / total sum of squares."""
    x = x - x.mean(0)
    _, inverse = groups.unique(return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, x.shape[1]).index_add_(0, inverse, x)
    means = sums / torch.bincount(inverse)[:, None]
    return float((means[inverse] ** 2).sum() / (x**2).sum())


def shares(backbone, images: Tensor, masks: Tensor, pixels: Tensor, pca_dim: int = 32) -> dict[str, float]:
    """images (B, 3, S, S) normalised, masks (B, S, S), pixels (B, 3, S, S) in [0, 255] -> shares."""
    backbone.eval()
    with torch.inference_mode():
        tokens, (h, w) = backbone.forward_patches(images)  # (B, N, D)
    labels = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest").long().flatten()
    colour = F.adaptive_avg_pool2d(pixels, (h, w)).permute(0, 2, 3, 1).reshape(-1, 3)
    colour_bin = (colour / 64).long().clamp(max=3) @ torch.tensor([16, 4, 1])
    image = torch.arange(len(images)).repeat_interleave(h * w)
    keep = labels < 255
    x = F.normalize(tokens.flatten(0, 1), dim=-1)[keep]
    x = x - x.mean(0)
    _, _, v = torch.pca_lowrank(x, q=pca_dim, center=False)
    x = x @ v
    labels, colour_bin, image = labels[keep], colour_bin[keep], image[keep]
    return {"class": explained_share(x, labels), "fg/bg": explained_share(x, (labels > 0).long()),
            "colour": explained_share(x, colour_bin), "image": explained_share(x, image)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbones", nargs="+", help="run folders (with backbone.pth), random_cnn or random_vit")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=100, help="val images used")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from densessl.constants import IMAGENET_MEAN, IMAGENET_STD
    from densessl.data import VOCSegmentation, ensure_synthetic_voc
    from densessl.data.datasets import SegTransform
    from densessl.evaluation.protocols import load_backbone
    from results_table import ROOT

    data = OmegaConf.load(ROOT / "configs" / "data" / "synthetic.yaml").synthetic
    val_set = VOCSegmentation(ensure_synthetic_voc(**OmegaConf.to_container(data)), "val")
    transform = SegTransform(args.image_size)
    images, masks = map(torch.stack, zip(*(transform(*val_set[i]) for i in range(min(args.images, len(val_set))))))
    std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    pixels = (images * std + mean) * 255  # undo SegTransform's normalisation
    quick = OmegaConf.load(ROOT / "configs" / "experiment" / "quickstart.yaml")
    untrained = {"random_cnn": {"name": "resnet18_os8", "weights": "none"},
                 "random_vit": {"name": "vit_tiny", "weights": "none", **OmegaConf.to_container(quick.backbone)}}
    print("| backbone | class | fg/bg | colour | image |\n|---|---|---|---|---|")
    for name in args.backbones:
        torch.manual_seed(0)
        backbone = load_backbone(untrained[name]) if name in untrained else load_backbone({}, name)
        s = shares(backbone, images, masks, pixels)
        print(f"| {name} | " + " | ".join(f"{s[k]:.3f}" for k in ("class", "fg/bg", "colour", "image")) + " |")


if __name__ == "__main__":
    main()
