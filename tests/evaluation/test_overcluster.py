from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from densessl.evaluation import (
    DenseFeatures,
    OverclusterInputs,
    OverclusterOptions,
    cluster_miou,
    confusion_matrix,
    extract_dense_features,
    overcluster,
    prepare_overcluster_inputs,
)
from densessl.evaluation.overcluster import _zscore_pca, resize_masks

NUM_CLASSES, GRID, PATCH, DIM = 4, 8, 4, 16
# One faiss thread: the data are tiny, and OpenMP spin-waits stall on a busy shared machine.
FAST = dict(pca_dim=8, niter=20, nredo=3, seeds=(0, 1), mask_size=16, num_threads=1)


def planted_features(num_images: int = 20, noise: float = 0.1, seed: int = 0) -> DenseFeatures:
    """Tokens = class prototype + small noise; masks (at input size GRID * PATCH) follow the token classes.

    Each image has a left and a right class at the token grid; 10% of mask pixels are ignore (255).
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = 3 * torch.randn(NUM_CLASSES, DIM, generator=gen)
    classes = torch.empty(num_images, GRID, GRID, dtype=torch.int64)
    for i in range(num_images):
        left, right = torch.randperm(NUM_CLASSES, generator=gen)[:2]
        classes[i, :, : GRID // 2], classes[i, :, GRID // 2 :] = left, right
    tokens = prototypes[classes] + noise * torch.randn(num_images, GRID, GRID, DIM, generator=gen)
    masks = classes.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).to(torch.uint8)
    masks[torch.rand(masks.shape, generator=gen) < 0.1] = 255
    return DenseFeatures(tokens, masks, (GRID * PATCH, GRID * PATCH))


def random_features(num_images: int = 20, seed: int = 0) -> DenseFeatures:
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, NUM_CLASSES, (num_images, GRID, GRID), generator=gen)
    masks = classes.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).to(torch.uint8)
    tokens = torch.randn(num_images, GRID, GRID, DIM, generator=gen)
    return DenseFeatures(tokens, masks, (GRID * PATCH, GRID * PATCH))


def test_planted_clusters_are_recovered_exactly():
    result = overcluster(planted_features(), NUM_CLASSES, ks=(NUM_CLASSES, 8), **FAST)
    assert result.miou[NUM_CLASSES] == pytest.approx([1.0, 1.0])  # K = C: Hungarian
    assert result.miou[8] == pytest.approx([1.0, 1.0])  # K > C: many-to-one


def test_random_features_score_near_chance():
    # Chance for uniform labels is about 1 / (2C - 1) = 0.14; planted features reach 1.0.
    result = overcluster(random_features(), NUM_CLASSES, ks=(NUM_CLASSES, 8), **FAST)
    for k in (NUM_CLASSES, 8):
        assert max(result.miou[k]) < 0.35


def test_cluster_miou_uses_hungarian_only_when_k_equals_num_classes():
    # Two tokens (= clusters 0, 1): token 0 holds 5 pixels of class 0 and 4 of class 1, token 1 one of class 0.
    inputs = OverclusterInputs(
        np.zeros((2, 1), np.float32), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.tensor([5, 4, 1]),
        torch.empty(0, 1, 1, dtype=torch.int64),
    )
    labels = torch.tensor([0, 1])
    value, mapping = cluster_miou(labels, inputs, k=2, num_classes=2)
    # Hungarian: cluster 0 -> class 1, cluster 1 -> class 0: IoUs 1/6 and 4/9
    assert mapping.tolist() == [1, 0] and value == pytest.approx((1 / 6 + 4 / 9) / 2)
    value, mapping = cluster_miou(labels, inputs, k=3, num_classes=2)
    # many-to-one (K=3 with an empty cluster): everything -> class 0: IoUs 6/10 and 0
    assert mapping.tolist() == [0, 0, 0] and value == pytest.approx(0.3)


def test_in_training_variant_clusters_upsampled_features():
    result = overcluster(planted_features(), NUM_CLASSES, ks=(NUM_CLASSES,), upsample="features", **FAST)
    assert min(result.miou[NUM_CLASSES]) > 0.9
    random = overcluster(random_features(), NUM_CLASSES, ks=(NUM_CLASSES,), upsample="features", **FAST)
    assert max(random.miou[NUM_CLASSES]) < 0.35


def test_result_reporting_and_matched_maps():
    features = planted_features()
    result = overcluster(features, NUM_CLASSES, ks=(NUM_CLASSES, 6), num_vis=3, **FAST)
    assert result.mean(6) == pytest.approx(np.mean(result.miou[6]))
    assert result.std(6) == pytest.approx(np.std(result.miou[6]))
    flat = result.as_dict()
    assert set(flat) == {f"k{k}_miou_{s}" for k in (4, 6) for s in ("mean", "std", "seed0", "seed1")}
    lines = result.table().splitlines()
    assert len(lines) == 3 and "hungarian" in lines[1] and "many-to-one" in lines[2]
    # mIoU is 1.0, so the matched maps reproduce the ground truth wherever it is not ignored
    keep = result.vis_targets != 255
    for k in (NUM_CLASSES, 6):
        assert result.matched_maps[k].shape == (3, 16, 16)
        assert torch.equal(result.matched_maps[k][keep], result.vis_targets[keep])


def test_cluster_maps_upsample_like_reference_interpolate():
    # Non-square grid and a non-integer ratio (6x8 tokens -> 20x20 pixels), no ignore pixels.
    gen = torch.Generator().manual_seed(0)
    features = DenseFeatures(torch.randn(3, 6, 8, DIM, generator=gen), torch.zeros(3, 20, 20, dtype=torch.uint8))
    inputs = prepare_overcluster_inputs(features, pca_dim=4, mask_size=20, num_vis=3)
    labels = torch.randint(0, 50, (3 * 6 * 8,), generator=gen)
    reference = F.interpolate(labels.view(3, 1, 6, 8).float(), size=(20, 20), mode="nearest").long()
    assert torch.equal(labels[inputs.rows_of_first][:, None], reference)


def test_masks_resized_like_reference_pil_then_nearest():
    gen = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 21, (2, 30, 45), generator=gen, dtype=torch.uint8)
    expected = []
    for mask in masks:  # reference: PIL NEAREST to the input size, then F.interpolate "nearest" to 20
        at_input = torch.from_numpy(np.array(Image.fromarray(mask.numpy()).resize((56, 56), Image.NEAREST)))
        expected.append(F.interpolate(at_input[None, None], size=(20, 20), mode="nearest")[0, 0])
    assert torch.equal(resize_masks(masks, 20, (56, 56)), torch.stack(expected))


def test_pixel_pairs_count_every_kept_pixel_once():
    features = planted_features()
    gt = resize_masks(features.masks, 16, features.image_size)
    inputs = prepare_overcluster_inputs(features, pca_dim=8, mask_size=16, num_vis=len(gt))
    labels = torch.arange(len(inputs.points))  # one cluster per token: the confusion is per (token, class)
    conf = confusion_matrix(labels[inputs.pair_rows], inputs.pair_classes, len(labels), NUM_CLASSES,
                            ignore_index=None, weights=inputs.pair_counts)
    expected = confusion_matrix(inputs.rows_of_first, gt.long(), len(labels), NUM_CLASSES)  # 255 dropped
    assert torch.equal(conf, expected)
    assert conf.sum() == (gt != 255).sum() < gt.numel()


def test_streamed_zscore_pca_matches_faiss_on_full_zscored_data():
    # 5000 rows > faiss' 1000 * dim training cap, so the subsampling path is exercised.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=gen) * torch.tensor([1.0, 5.0, 0.1, 2.0]) + 3.0
    x[:, 3] += 0.8 * x[:, 1]
    ours = _zscore_pca(lambda: iter(x.split(700)), len(x), 4, 2)
    z = ((x.double() - x.double().mean(0)) / x.double().std(0, correction=0)).float().numpy()
    pca = faiss.PCAMatrix(4, 2)
    pca.train(z)
    np.testing.assert_allclose(ours, pca.apply(z), atol=1e-4)


def test_bad_arguments_raise_clear_errors():
    features = planted_features(num_images=2)
    with pytest.raises(ValueError, match="pca_dim"):
        overcluster(features, NUM_CLASSES, ks=(4,), pca_dim=DIM + 1)
    with pytest.raises(ValueError, match="exceeds the number of points"):
        overcluster(features, NUM_CLASSES, ks=(1000,), pca_dim=4)
    with pytest.raises(ValueError, match="upsample"):
        overcluster(features, NUM_CLASSES, ks=(4,), pca_dim=4, upsample="bilinear")
    with pytest.raises(ValueError, match="target values"):
        overcluster(features, 2, ks=(3,), pca_dim=4, niter=2, nredo=1, seeds=(0,))


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="faiss has GPU support here")
def test_gpu_without_faiss_gpu_raises():
    with pytest.raises(ValueError, match="faiss-gpu"):
        overcluster(planted_features(num_images=2), NUM_CLASSES, ks=(4,), pca_dim=4, gpu=True)


class TinyBackbone(nn.Module):
    """Stand-in with the Backbone contract: forward_patches -> ((B, N, D), (h, w))."""

    patch_size, embed_dim = PATCH, DIM

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.modes: list[bool] = []

    def forward_patches(self, images):
        self.modes.append(self.training)
        out = self.proj(images)
        return out.flatten(2).transpose(1, 2), tuple(out.shape[-2:])


def test_extract_dense_features_shapes_values_and_mode_restore():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 24, 32, generator=gen)
    masks = torch.randint(0, 21, (7, 24, 32), generator=gen)
    masks[:, 0] = 255
    backbone = TinyBackbone().train()
    loader = DataLoader(TensorDataset(images, masks), batch_size=3)  # last batch is partial
    features = extract_dense_features(backbone, loader)
    assert backbone.training and backbone.modes == [False, False, False]
    assert features.tokens.shape == (7, 6, 8, DIM) and features.tokens.dtype == torch.float32
    assert features.grid == (6, 8) and features.image_size == (24, 32)
    assert features.masks.dtype == torch.uint8 and torch.equal(features.masks.long(), masks)
    with torch.no_grad():
        expected = backbone.proj(images).permute(0, 2, 3, 1)
    torch.testing.assert_close(features.tokens, expected)
    features.tokens.mul_(2)  # buffers are ordinary tensors, usable outside inference mode

    backbone.eval()
    capped = extract_dense_features(backbone, loader, max_images=5)
    assert not backbone.training
    assert capped.num_images == 5 and torch.equal(capped.masks.long(), masks[:5])


def test_extract_dense_features_rejects_uint8_images():
    loader = [(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 8, dtype=torch.int64))]
    with pytest.raises(ValueError, match="normalised float"):
        extract_dense_features(TinyBackbone(), loader, max_images=2)


def test_configs_restate_the_protocol_defaults():
    """OverclusterOptions is the home of the protocol's defaults: the configs that list its fields state the
    same values, apart from the keys each sets on purpose."""
    root = Path(__file__).resolve().parents[2] / "configs"
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(OverclusterOptions()).items()}
    blocks = {"eval.options": (OmegaConf.load(root / "eval" / "overcluster.yaml").options,
                               {"num_vis", "gpu", "progress"}),
              "overcluster": (OmegaConf.load(root / "train.yaml").overcluster, {"num_vis"})}
    for name, (block, own) in blocks.items():
        listed = {k: v for k, v in OmegaConf.to_container(block).items() if k not in own}
        assert set(listed) <= set(defaults), name
        assert listed == {k: defaults[k] for k in listed}, name


def test_misspelt_option_names_itself():
    with pytest.raises(ValueError, match=r"OverclusterOptions.nitre is not an option \(did you mean "
                                         r"OverclusterOptions.niter\?\)"):
        overcluster(planted_features(), NUM_CLASSES, ks=(NUM_CLASSES,), nitre=5)
