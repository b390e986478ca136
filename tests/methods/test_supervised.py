"""The supervised baseline of the results table: labelled views, the loss, and that it fits its masks."""
import torch

from densessl.methods import Supervised

BACKBONE = dict(name="vit_tiny", weights="none", img_size=32, model_kwargs=dict(depth=1, patch_size=8))
OPTIM = dict(name="adamw", lr=1e-3, weight_decay=0.0)


def test_views_keep_image_and_mask_aligned_and_the_loss_falls(synthetic):
    train, _ = synthetic
    method = Supervised(BACKBONE, OPTIM, num_classes=7, crops=dict(size=32, scale=(1.0, 1.0)))
    transform = method.train_transform()
    batch = method.collate_fn([transform(*train[i]) for i in range(4)])
    images, masks = batch["crops"][0], batch["masks"]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32)
    assert set(masks.unique().tolist()) <= set(range(7)) | {255}
    # scale (1, 1) is the whole image: the mask is the resized full mask (flip aside), so labels line up
    batch["crops"] = [method.color(images)]
    groups = {name: module for name, module, _ in method.param_groups()}
    assert set(groups) == {"backbone", "head"} and groups["head"] is method.head  # the head is trained too
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        terms = method.compute_loss(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"]))
    assert terms["dense"].shape == (4, 16, method.student_backbone.embed_dim)
    assert losses[-1] < 0.5 * losses[0]


def test_unlabelled_training_data_is_a_clear_error():
    import pytest
    from PIL import Image

    from densessl.data.datamodule import UnlabeledImages

    method = Supervised(BACKBONE, OPTIM, num_classes=7, crops=dict(size=32))
    data = UnlabeledImages([Image.new("RGB", (32, 32))], method.train_transform(), with_labels=True)
    with pytest.raises(ValueError, match="trains on masks"):
        data[0]
