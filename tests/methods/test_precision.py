"""Mixed precision (trainer.precision=bf16-mixed) on CPU: every objective, the DSE regularizer, the custom
autograd functions; and SSLMethod overrides keeping the base signatures. bf16-mixed runs of train.py with every
objective, the DSE regularizer and the evaluators: tests/cli/test_matrix.py.

Lightning's bf16-mixed runs training_step under ``torch.autocast(device, dtype=torch.bfloat16)`` and backward
outside it, which is what the in-process tests do. float16 (16-mixed, GPU) is not exercised here: no GPU.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import math
import pkgutil
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import densessl.methods
from densessl.losses import neco_loss, soft_permutation, sort_loss
from densessl.losses.densecl import info_nce
from densessl.methods import IBOT, UDI, DenseCL, NeCo, SSLMethod, Supervised
from densessl.methods.base import override_mismatches
from densessl.methods.ibot import collate_ibot
from densessl.metrics import dse_regularizer
from densessl.transforms import collate_multicrop

TINY = dict(name="vit_tiny", img_size=32, model_kwargs=dict(depth=1, patch_size=8, embed_dim=32, num_heads=2))
CROPS = dict(global_size=32, local_size=16, n_local=2)
BF16 = torch.bfloat16

# bfloat16 keeps 8 significant bits: one rounding is at most 2^-9 ~ 0.2 % relative. Over 4 seeds per objective
# the bf16 losses of these tiny models were within 0.3 % of float32 (NeCo, NeCo-fg, iBOT, iBOT+DC, UDI, DenseCL).
# 2 % leaves ~7x margin for other CPUs' bf16 kernels, and still fails on what these tests guard against: an error,
# inf/nan (NeCo's sort in bf16 gave inf), or a moved threshold (NeCo-fg's mask in bf16 moved its loss by 3-14 %).
LOSS_RTOL = 0.02
# Direction of the student backbone's gradient, bf16 vs float32: NeCo sorts similarities at steepness 100, which
# amplifies bf16 rounding of the features (cosine 0.91-0.999 over 4 seeds); every other objective gave > 0.999.
GRAD_COSINE = 0.8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)) for _ in range(n)]


def _neco(**kwargs) -> tuple[SSLMethod, dict]:
    method = NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), roi_size=3,
                  queue_size=64, queue_push=4, crops=dict(CROPS), **kwargs)
    batch = collate_multicrop([method.train_transform()(image) for image in _images(4)])
    batch["crops"] = [method.color(c) for c in batch["crops"]]
    return method, batch


def _ibot(**kwargs) -> tuple[SSLMethod, dict]:
    method = IBOT(dict(TINY), {"lr": 1e-3}, head={"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8},
                  crops=dict(CROPS), **kwargs)
    batch = collate_ibot([method.train_transform()(image) for image in _images(8)])
    batch["crops"] = [method.color(c) for c in batch["crops"]]
    return method, method.prepare_views(batch)


def _udi() -> tuple[SSLMethod, dict]:
    method = UDI(backbone=dict(TINY, weights="none"), optim=dict(lr=1e-3),
                 head=dict(out_dim=32, hidden_dim=32, bottleneck_dim=16), crops=dict(CROPS),
                 srs_window_global=2, srs_window_local=1)
    batch = collate_multicrop([method.train_transform()(image) for image in _images(4)])
    batch["crops"] = [method._colour(c, method.stream()) for c in batch["crops"]]
    return method, batch


def _densecl() -> tuple[SSLMethod, dict]:
    method = DenseCL(backbone=dict(TINY), optim=dict(name="sgd", lr=0.03), neck=dict(hidden_dim=64, out_dim=16),
                     queue_size=32)
    views = torch.randint(0, 255, (2, 4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return method, {"crops": [method.color(v) for v in views]}


def _supervised() -> tuple[SSLMethod, dict]:
    method = Supervised(dict(TINY), dict(lr=1e-3), num_classes=7, crops=dict(size=32))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return method, {"crops": [method.color(images)], "masks": torch.randint(0, 7, (4, 32, 32), generator=gen)}


OBJECTIVES = {
    "neco": lambda: _neco(),
    "neco_fg": lambda: _neco(loss_mask="fg"),
    "ibot": lambda: _ibot(),
    "ibot_decoupling": lambda: _ibot(decoupling=True, masking={"shape": "rcc", "ratio": 0.4}),
    "udi": _udi,
    "densecl": _densecl,
    "supervised": _supervised,
}


def _build(name: str) -> tuple[SSLMethod, dict]:
    torch.manual_seed(0)
    random.seed(0)
    return OBJECTIVES[name]()


def _step(method: SSLMethod, batch: dict, dtype: torch.dtype | None) -> tuple[dict, SSLMethod]:
    """compute_loss on copies (queues and centres change in a step) under autocast to ``dtype`` (None: off),
    then backward outside autocast, as Lightning runs them."""
    method, batch = copy.deepcopy(method), copy.deepcopy(batch)
    torch.manual_seed(1)  # drop path, reference shuffles: the same draws in both runs
    random.seed(1)
    with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
        terms = method.compute_loss(batch)
    terms["loss"].backward()
    return terms, method


def _backbone_grad(method: SSLMethod) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in method.student_backbone.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_bf16_autocast_loss_matches_float32_and_trains(name):
    method, batch = _build(name)
    ref, ref_method = _step(method, batch, None)
    low, low_method = _step(method, batch, BF16)
    f32, bf16 = ref["loss"].item(), low["loss"].item()
    assert math.isfinite(bf16), f"{name}: bf16 loss {bf16}"
    assert low["loss"].dtype == torch.float32  # losses are reduced in float32 whatever the autocast dtype
    rel = abs(bf16 - f32) / abs(f32)
    grads = [p.grad for p in low_method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradients under bf16"
    g_ref, g_low = _backbone_grad(ref_method), _backbone_grad(low_method)
    cosine = F.cosine_similarity(g_ref, g_low, dim=0).item()
    print(f"{name}: float32 {f32:.5f} bf16 {bf16:.5f} relative difference {rel:.3%} gradient cosine {cosine:.4f}")
    assert rel <= LOSS_RTOL, f"{name}: bf16 loss {bf16} vs float32 {f32} ({rel:.2%})"
    assert g_low.abs().sum() > 0 and cosine >= GRAD_COSINE, f"{name}: gradient cosine {cosine}"
    # and the optimiser step (the objective's own parameter groups) keeps every weight finite
    optimizer = low_method.configure_optimizers()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in low_method.parameters())


def test_neco_fg_mask_is_the_float32_one_under_bf16():
    # The foreground threshold on cumulative attention mass: in bf16 (attention logits, the blur's conv2d) a
    # quarter of the tokens of a flat random-init map changed side; both now run in float32.
    method, batch = _build("neco_fg")
    views = []
    for enabled in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=enabled):
            views.append(method.forward_views(copy.deepcopy(batch)))
    for a, b in zip(views[0]["token_masks"], views[1]["token_masks"]):
        assert torch.equal(a, b)
    assert torch.equal(views[0]["query_mask"], views[1]["query_mask"])


def test_dse_regularizer_under_autocast_is_the_float32_one():
    torch.manual_seed(0)
    tokens = torch.randn(4, 16, 32, requires_grad=True)
    options = dict(local_clusters=3, global_clusters=6)
    ref = dse_regularizer(tokens, generator=torch.Generator().manual_seed(0), **options)
    (g_ref,) = torch.autograd.grad(ref, tokens)
    with torch.autocast("cpu", dtype=BF16):
        low = dse_regularizer(tokens, generator=torch.Generator().manual_seed(0), **options)
    (g_low,) = torch.autograd.grad(low, tokens)
    # autocast is off inside: same value and gradient (under autocast its matmuls ran k-means and the
    # backward in bf16, gradients off by ~25 % of their largest entry)
    assert low.dtype == torch.float32 and torch.equal(low, ref)
    torch.testing.assert_close(g_low, g_ref, rtol=0, atol=1e-7)
    # bf16 tokens (a bf16 backbone output): float32 value, bf16 gradient, both finite
    half = tokens.detach().to(BF16).requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        value = dse_regularizer(half, generator=torch.Generator().manual_seed(0), **options)
    value.backward()
    assert value.dtype == torch.float32 and math.isfinite(value.item()) and abs(value.item() - ref.item()) < 0.01
    assert half.grad.dtype == BF16 and torch.isfinite(half.grad).all()


def test_training_step_with_dse_regularizer_under_bf16_autocast():
    method = NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), roi_size=3,
                  queue_size=0, crops=dict(CROPS), dse_regularizer=dict(weight=0.001, local_clusters=3,
                                                                        global_clusters=6))
    torch.manual_seed(0)
    random.seed(0)
    batch = collate_multicrop([method.train_transform()(image) for image in _images(4)])
    batch["crops"] = [method.color(c) for c in batch["crops"]]
    losses = []
    for enabled in (False, True):
        m = copy.deepcopy(method)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=BF16, enabled=enabled):
            loss = m.training_step(copy.deepcopy(batch), 0)  # loss - 0.001 * DSE(student tokens)
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)


# --------------------------------------------------------------------------- custom autograd functions
def test_info_nce_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(*s), dim=-1).requires_grad_() for s in ((6, 8), (6, 8), (20, 8)))
    ref = info_nce(q, p, n, 0.2)
    grads = torch.autograd.grad(ref, (q, p, n))
    with torch.autocast("cpu", dtype=BF16):
        low = info_nce(q, p, n, 0.2)
    # the failure this fixes: backward mixed the saved bf16 probabilities with float32 inputs
    low_grads = torch.autograd.grad(low, (q, p, n))
    assert torch.equal(low, ref)
    for a, b in zip(low_grads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # half-precision inputs: float32 loss, gradients in the inputs' dtype, close to float32
    for dtype in (BF16, torch.float16):
        half = [t.detach().to(dtype).requires_grad_() for t in (q, p, n)]
        value = info_nce(*half, 0.2)
        value.backward()
        assert value.dtype == torch.float32 and value.item() == pytest.approx(ref.item(), rel=LOSS_RTOL)
        assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in half)


@pytest.mark.parametrize("chunk_rows", [None, 4])  # 4: the chunked path through _GivenGrad
def test_sorting_runs_in_float32_under_autocast(chunk_rows):
    torch.manual_seed(0)
    student = torch.randn(2, 6, 5, 8).requires_grad_()  # (P, B, K, D): _LayerMix and _MergeMix of 8 refs
    teacher, refs = torch.randn(2, 6, 5, 8), torch.randn(2, 6, 8, 8)
    ref = neco_loss(student, teacher, refs, chunk_rows=chunk_rows)
    (g_ref,) = torch.autograd.grad(ref, student)
    with torch.autocast("cpu", dtype=BF16):
        low = neco_loss(student, teacher, refs, chunk_rows=chunk_rows)
        perm = soft_permutation(torch.randn(3, 7))
    (g_low,) = torch.autograd.grad(low, student)
    assert torch.equal(low, ref) and perm.dtype == torch.float32
    torch.testing.assert_close(g_low, g_ref, rtol=0, atol=0)
    # bf16 similarities straight into sort_loss: sorted in float32, so finite (in bf16, inf: comparator
    # weights at steepness 100 round to exactly 0 and 1)
    sims = torch.rand(12, 8).to(BF16).requires_grad_()
    value = sort_loss(sims, torch.rand(12, 8).to(BF16), chunk_rows=chunk_rows)
    value.backward()
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    assert sims.grad.dtype == BF16 and torch.isfinite(sims.grad).all()


def test_every_custom_autograd_function_is_covered():
    # New torch.autograd.Function subclasses in densessl need a test here (autocast-safe forward and backward).
    import densessl

    found = set()
    for info in pkgutil.walk_packages(densessl.__path__, "densessl."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency missing on this machine
            continue
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) and obj.__module__ == info.name):
                found.add(f"{info.name}.{obj.__name__}")
    assert found == {"densessl.losses.densecl._InfoNCE", "densessl.losses.neco._GivenGrad",
                     "densessl.losses.sorting._LayerMix", "densessl.losses.sorting._MergeMix"}


# --------------------------------------------------------------------------- CLI
# bf16-mixed through experiments/train.py, with the DSE regularizer and every evaluator: the matrix cell
# densecl-bf16-on-single-all of tests/cli/test_matrix.py (and bf16 with every other objective there).


# --------------------------------------------------------------------------- hook signatures
def _method_classes() -> list[type]:
    classes = set()
    for info in pkgutil.walk_packages(densessl.methods.__path__, "densessl.methods."):
        module = importlib.import_module(info.name)
        classes |= {obj for obj in vars(module).values()
                    if inspect.isclass(obj) and issubclass(obj, SSLMethod) and obj is not SSLMethod}
    return sorted(classes, key=lambda c: c.__name__)


def test_every_method_keeps_the_base_signatures_of_what_it_overrides():
    classes = _method_classes()
    assert {c.__name__ for c in classes} >= {"NeCo", "IBOT", "UDI", "DenseCL", "Supervised"}
    # Every public override, SSLMethod's own hooks and Lightning's (training_step, on_before_optimizer_step, ...).
    problems = [p for cls in classes for p in override_mismatches(cls, SSLMethod)]
    assert problems == []
    # UDI once had generator(self) -> its stream, shadowing generator(name, device, seed) that the DSE
    # regularizer calls; its stream now has its own name and goes through the base generator.
    assert "generator" not in vars(UDI) and UDI.generator is SSLMethod.generator
    udi, _ = _build("udi")
    assert udi.stream() is udi.generator("udi", torch.device("cpu"), udi.seed)


def test_a_changed_signature_is_reported_and_rejected_at_class_definition():
    class Probe:  # not an SSLMethod: only the checker runs
        def generator(self) -> torch.Generator: ...
        def compute_loss(self, batch, step): ...
        def param_groups(self): ...
        uses_labels = True  # data, not a hook
        total_steps = staticmethod(lambda: 0)

    problems = override_mismatches(Probe, SSLMethod)
    assert len(problems) == 3, problems
    assert any(p.startswith("Probe.generator(self)") and "SSLMethod.generator(self, name" in p for p in problems)
    assert any(p.startswith("Probe.compute_loss(self, batch, step)") for p in problems)
    assert any("Probe.total_steps is a staticmethod, SSLMethod.total_steps a property" in p for p in problems)
    with pytest.raises(TypeError, match=r"OldUDI.generator\(self\).*overrides SSLMethod.generator"):
        class OldUDI(SSLMethod):
            def generator(self) -> torch.Generator: ...
