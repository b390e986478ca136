import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from PIL import Image

from conftest import TinyBackbone
from densessl.data.datasets import SegTransform
from densessl.evaluation.linear import LinearSegmentation, linear_logits, train_linear
from densessl.evaluation.metrics import miou

C, D, GRID, PATCH = 4, 8, 4, 8
SIZE = GRID * PATCH


def planted(num_images: int, seed: int, shuffle_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (n, h, w, D) = class prototypes + noise; masks (n, SIZE, SIZE) with a left and a right class.

    shuffle_labels: the mask classes are drawn independently of the tokens (nothing to learn).
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = 2 * torch.randn(C, D, generator=torch.Generator().manual_seed(123))
    classes = torch.empty(num_images, GRID, GRID, dtype=torch.int64)
    for i in range(num_images):
        left, right = torch.randperm(C, generator=gen)[:2]
        classes[i, :, : GRID // 2], classes[i, :, GRID // 2 :] = left, right
    tokens = prototypes[classes] + 0.1 * torch.randn(num_images, GRID, GRID, D, generator=gen)
    if shuffle_labels:
        classes = torch.randint(0, C, classes.shape, generator=gen)
    masks = classes.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    return tokens, masks


def fit(tokens: torch.Tensor, masks: torch.Tensor, epochs: int) -> LinearSegmentation:
    torch.manual_seed(0)
    module = LinearSegmentation(D, C, lr=0.1, train_mask_size=GRID)
    loader = DataLoader(TensorDataset(tokens, masks), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module.eval()


def token_res_miou(module: LinearSegmentation, tokens: torch.Tensor, masks: torch.Tensor) -> float:
    # At token resolution: at full resolution the argmax of bilinearly upsampled logits flips near, not
    # exactly at, a class boundary (it depends on the learnt margins), costing ~2% of a 32 px image.
    with torch.no_grad():
        return miou(module.confusion(tokens, masks, mask_size=GRID))


def test_conv_then_upsample_equals_upsample_then_conv():
    torch.manual_seed(0)
    head = nn.Conv2d(16, 5, 1)
    tokens = torch.randn(2, 16, 4, 6)
    for size in [(100, 100), (37, 23), (4, 6)]:
        reference = head(F.interpolate(tokens, size=size, mode="bilinear"))  # NeCo's order
        torch.testing.assert_close(linear_logits(head, tokens, size), reference, atol=1e-5, rtol=1e-5)


def test_separable_features_reach_miou_one():
    tokens, masks = planted(64, seed=0)
    module = fit(tokens, masks, epochs=8)
    val_tokens, val_masks = planted(16, seed=1)
    assert token_res_miou(module, val_tokens, val_masks) == pytest.approx(1.0)


def test_shuffled_labels_score_chance():
    # Chance is about 1 / (2C - 1) = 0.14 for uniform predictions; separable features reach 1.0.
    tokens, masks = planted(64, seed=0, shuffle_labels=True)
    module = fit(tokens, masks, epochs=3)
    val_tokens, val_masks = planted(16, seed=1, shuffle_labels=True)
    assert token_res_miou(module, val_tokens, val_masks) < 0.3


def test_miou_and_loss_ignore_255():
    tokens, masks = planted(64, seed=0)
    # Training: a quarter of every mask is ignore; were it read as a class, it would be learnt.
    noisy = masks.clone()
    noisy[:, : SIZE // 2, : SIZE // 2] = 255
    module = fit(tokens, noisy, epochs=8)
    val_tokens, val_masks = planted(16, seed=1)
    assert token_res_miou(module, val_tokens, val_masks) == pytest.approx(1.0)
    # Evaluation: the first token column is ignore, except one pixel with a wrong label.
    val_masks[:, :, :PATCH] = 255
    val_masks[:, 0, 0] = (val_masks[:, 0, PATCH] + 1) % C
    with torch.no_grad():
        conf = module.confusion(val_tokens, val_masks, mask_size=GRID)
    assert conf.sum() == 16 * (GRID * GRID - GRID + 1)  # ignore pixels dropped
    assert conf.sum() - conf.trace() == 16  # the wrong pixel of each image is counted


def test_train_linear_end_to_end_and_cache_parity(synthetic):
    train, val = synthetic
    torch.manual_seed(0)
    backbone = TinyBackbone().train()
    common = dict(image_size=64, epochs=2, batch_size=4, eval_batch_size=4, train_mask_size=32, val_mask_size=32)
    result = train_linear(backbone, train, val, **common)  # augment=True: backbone on every batch
    assert len(result.val_history) == 2 and 0.0 <= result.miou_full_res <= 1.0
    assert result.miou_train_time_val_100px == result.val_history[-1]
    assert result.head.weight.shape == (7, 16, 1, 1)
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())  # state restored
    # Without augmentation, cached tokens and running the backbone per batch train the same head.
    cached = train_linear(backbone, train, val, augment=False, cache_features=True, num_vis=2, **common)
    live = train_linear(backbone, train, val, augment=False, num_vis=2, **common)
    torch.testing.assert_close(cached.head.weight, live.head.weight)
    assert cached.miou_full_res == live.miou_full_res and cached.val_history == live.val_history
    # Pictures: the first 2 val images at the full-resolution metric's size, from either pipeline.
    assert result.vis_predictions is None and result.vis_targets is None  # num_vis=0 keeps nothing
    expected = torch.stack([SegTransform(64)(*val[i])[1] for i in range(2)]).to(torch.uint8)
    assert torch.equal(cached.vis_targets, expected) and torch.equal(live.vis_targets, expected)
    assert cached.vis_predictions.shape == (2, 64, 64) and cached.vis_predictions.dtype == torch.uint8
    assert torch.equal(cached.vis_predictions, live.vis_predictions)
    with pytest.raises(ValueError, match="augment=False"):
        train_linear(backbone, train, val, cache_features=True, **common)


PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]  # class c = one uniform colour


class ColourScenes:
    """Uniform 32 px images of colour ``PALETTE[c]``, c = (i + offset) % 4, masks of class (c + label_shift) % 4
    with the top ``band`` rows ignore (255): a known answer for the linear probe and retrieval pictures."""

    num_classes = 4

    def __init__(self, n: int, offset: int = 0, band: int = 4, label_shift: int = 0, size: int = 32) -> None:
        self.items = []
        for i in range(n):
            c = (i + offset) % 4
            mask = np.full((size, size), (c + label_shift) % 4, np.uint8)
            mask[:band] = 255
            self.items.append((Image.new("RGB", (size, size), PALETTE[c]), Image.fromarray(mask)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class ColourBackbone(nn.Module):
    """Patch tokens = the mean normalised colour of each 8 px patch: the four colours are linearly separable."""

    patch_size, embed_dim = 8, 3

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 3, 8, 8, bias=False)
        with torch.no_grad():
            self.proj.weight.zero_()
            for ch in range(3):
                self.proj.weight[ch, ch] = 1 / 64

    def forward_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(images)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])


def test_train_linear_keeps_the_predictions_of_the_first_val_images():
    val = ColourScenes(5, offset=1)
    # 4 kept images across two eval batches of 3; masks 32 px -> 48 px (the ignore band becomes 6 rows).
    result = train_linear(ColourBackbone(), ColourScenes(8), val, image_size=48, epochs=10, batch_size=2, lr=0.1,
                          augment=False, cache_features=True, train_mask_size=6, val_mask_size=6, eval_batch_size=3,
                          num_vis=4)
    assert result.miou_full_res == pytest.approx(1.0)
    expected = torch.stack([SegTransform(48)(*val[i])[1] for i in range(4)]).to(torch.uint8)
    assert result.vis_targets.dtype == torch.uint8 and torch.equal(result.vis_targets, expected)
    assert (expected[:, :6] == 255).all() and (expected[:, 6:] != 255).all()
    assert expected[:, -1, -1].tolist() == [1, 2, 3, 0]
    keep = expected != 255
    assert result.vis_predictions.shape == (4, 48, 48)
    assert torch.equal(result.vis_predictions[keep], expected[keep])


def test_lbfgs_probe_fits_planted_classes_and_folds_the_zscore_back():
    """Known answer: planted prototypes are linearly separable, so the converged head is perfect at token
    resolution; on shuffled labels it is no better than chance. The head it returns works on raw tokens."""
    from densessl.evaluation.linear import fit_lbfgs

    tokens, masks = planted(32, seed=0)
    tokens = 50.0 + 30.0 * tokens  # badly scaled raw tokens: the z-score is what makes L-BFGS well conditioned
    head = nn.Conv2d(D, C, 1)
    fit_lbfgs(head, tokens, F.interpolate(masks[:, None].float(), size=(GRID, GRID)).squeeze(1).long(), max_iter=100)
    val_tokens, val_masks = planted(16, seed=1)
    with torch.no_grad():
        pred = linear_logits(head, (50.0 + 30.0 * val_tokens).permute(0, 3, 1, 2), (GRID, GRID)).argmax(1)
    from densessl.evaluation.metrics import confusion_matrix

    target = val_masks[:, ::PATCH, ::PATCH]
    assert miou(confusion_matrix(pred, target, C, C, 255)) == 1.0
    shuffled_tokens, shuffled = planted(32, seed=2, shuffle_labels=True)
    head = nn.Conv2d(D, C, 1)
    fit_lbfgs(head, shuffled_tokens, shuffled[:, ::PATCH, ::PATCH], max_iter=100)
    with torch.no_grad():
        pred = linear_logits(head, val_tokens.permute(0, 3, 1, 2), (GRID, GRID)).argmax(1)
    assert miou(confusion_matrix(pred, target, C, C, 255)) < 0.5


def test_lbfgs_solver_is_more_sensitive_than_a_few_sgd_steps(synthetic):
    """The reason for the solver: with one SGD step (the reference recipe on a tiny split) the head is far
    from separating planted classes; L-BFGS on the same tokens separates them. Through train_linear too."""
    from densessl.evaluation.linear import fit_lbfgs

    tokens, masks = planted(16, seed=0)
    sgd = fit(tokens, masks, epochs=1)  # 16 images, batch 16: one step
    lbfgs = LinearSegmentation(D, C, train_mask_size=GRID)
    fit_lbfgs(lbfgs.head, tokens, masks[:, ::PATCH, ::PATCH])
    assert token_res_miou(lbfgs.eval(), tokens, masks) == 1.0 > token_res_miou(sgd, tokens, masks) + 0.2

    train, val = synthetic
    backbone = TinyBackbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = train_linear(backbone, train, val, image_size=64, cache_features=True, augment=False, solver="lbfgs",
                          train_mask_size=32, max_iter=20)
    assert 0.0 < result.miou_full_res <= 1.0 and len(result.val_history) == 1
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    with pytest.raises(ValueError, match="cache_features=True"):
        train_linear(backbone, train, val, image_size=64, solver="lbfgs")
    with pytest.raises(ValueError, match="solver"):
        train_linear(backbone, train, val, image_size=64, cache_features=True, augment=False, solver="adam")
