"""What every objective shares: student/teacher backbones, optimiser groups, per-step schedules,
EMA, on-device colour augmentation, the optional DSE regularizer and the non-finite-loss guard.

An objective subclasses :class:`SSLMethod`, builds its heads in ``__init__``, and implements
``compute_loss(batch) -> dict`` (``"loss"`` plus any terms to log; ``"dense"``, the student's patch
tokens (B, N, D), enables the DSE regularizer). Optionally it overrides ``momentum_pairs`` and
``param_groups``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from densessl.metrics import DSEOptions, dse_regularizer
from densessl.models import Backbone, cosine_momentum, ema_update, make_teacher
from densessl.options import parse_options
from densessl.schedules import cosine_schedule
from densessl.transforms import ColorAugment, MultiCropWithBoxes, collate_multicrop


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/inf; Lightning does not checkpoint on exceptions, so the last good
    checkpoint on disk stays untouched."""


def _shape(fn: Callable[..., Any]) -> list[tuple[str, str, bool]]:
    """(name, kind, has a default) of every parameter: what callers rely on, annotations aside."""
    return [(p.name, p.kind.name, p.default is not inspect.Parameter.empty)
            for p in inspect.signature(fn).parameters.values()]


def override_mismatches(cls: type, base: type, names: Iterable[str] | None = None) -> list[str]:
    """Public attributes that ``cls`` itself defines (not inherited) and that override one of ``base``
    (or only those in ``names``) with another call shape: parameter names, kinds and which parameters
    have defaults must be the base's, and a method stays a method (a staticmethod a staticmethod, a
    property a property). One line per mismatch, naming both signatures."""
    problems = []
    for name, attr in vars(cls).items():
        if name.startswith("_") or (names is not None and name not in names) or not hasattr(base, name):
            continue
        base_attr = inspect.getattr_static(base, name)
        if not callable(base_attr) and not isinstance(base_attr, (staticmethod, classmethod, property)):
            continue  # plain class attributes (e.g. uses_labels) are data, not hooks
        if type(attr) is not type(base_attr):
            problems.append(f"{cls.__name__}.{name} is a {type(attr).__name__}, "
                            f"{base.__name__}.{name} a {type(base_attr).__name__}")
            continue
        if isinstance(attr, property):
            continue
        mine, theirs = getattr(cls, name), getattr(base, name)
        if _shape(mine) != _shape(theirs):
            problems.append(f"{cls.__name__}.{name}{inspect.signature(mine)} overrides "
                            f"{base.__name__}.{name}{inspect.signature(theirs)} with other parameters")
    return problems


@dataclass
class OptimOptions:
    """``method.optim`` (see :class:`SSLMethod`)."""

    lr: float
    name: str = "adamw"
    head_lr: float | None = None  # None: lr
    weight_decay: float = 0.0
    final_weight_decay: float | None = None  # None: weight_decay (constant)
    final_lr: float = 0.0
    warmup_epochs: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    batch_size_scaling: bool = False
    schedule: str = "cosine"  # or "constant": lr and weight decay stay at their base values

    def __post_init__(self) -> None:
        self.head_lr = self.lr if self.head_lr is None else self.head_lr
        self.final_weight_decay = self.weight_decay if self.final_weight_decay is None else self.final_weight_decay


@dataclass
class TeacherOptions:
    """``method.teacher``: base EMA momentum and the end of its cosine schedule."""

    momentum: float
    final_momentum: float = 1.0


class SSLMethod(L.LightningModule):
    """Base LightningModule for dense SSL objectives.

    Args:
        backbone: keyword arguments of :class:`densessl.models.Backbone` (the ``backbone`` config group).
        optim: ``name`` (adamw|sgd), ``lr`` (backbone), ``head_lr`` (defaults to lr), ``weight_decay``,
            ``final_weight_decay``, ``final_lr`` (absolute, for every group scaled by its lr ratio),
            ``warmup_epochs``, ``betas`` / ``momentum``, ``batch_size_scaling`` (linear lr scaling
            by global batch / 256, as DINO/iBOT), ``schedule`` (cosine | constant); read into
            :class:`OptimOptions` (``self.optim_cfg``), an unknown key is a ValueError.
        teacher: ``None`` for no teacher, else ``momentum`` (base) and ``final_momentum`` of the cosine
            EMA schedule (:class:`TeacherOptions`, ``self.teacher_cfg``).
        color: keyword arguments of :class:`ColorAugment` applied on device to every crop.
        dse_regularizer: ``weight`` (beta) and the fields of :class:`~densessl.metrics.DSEOptions`
            (``self.dse_options``, an unknown key is a ValueError); adds -beta * DSE(student patch tokens).
        eval_on: which network evaluators and exports use ("teacher" or "student").
        student_drop_path: stochastic depth of the student only (the teacher always has none).
        crops: keyword arguments of :class:`MultiCropWithBoxes` (the CPU-side view sampler).
        compile: ``torch.compile`` keyword arguments (e.g. ``{mode: max-autotune}``) to compile the
            backbones in place before training; ``None`` (default) runs eagerly.
    """

    # True for objectives whose views need the training masks (the supervised baseline): the data
    # module then hands them (image, mask) items instead of images.
    uses_labels = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # densessl calls these hooks with the base signatures (e.g. the DSE regularizer calls
        # self.generator(name, device, seed)): an override with other parameters fails at import,
        # not mid-run.
        super().__init_subclass__(**kwargs)
        own = [n for n in vars(SSLMethod) if not n.startswith("_")]
        problems = override_mismatches(cls, SSLMethod, own)
        if problems:
            raise TypeError("; ".join(problems) + ". Keep the base signature (add a new method for other "
                            "parameters).")

    def __init__(self, backbone: dict[str, Any], optim: dict[str, Any], teacher: dict[str, Any] | None = None,
                 color: dict[str, Any] | None = None, dse_regularizer: dict[str, Any] | None = None,
                 eval_on: str = "teacher", student_drop_path: float | None = None,
                 crops: dict[str, Any] | None = None, compile: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # in checkpoints; train() logs the whole config once
        # Parsed first: a misspelt key fails before any network is built.
        self.optim_cfg: OptimOptions = parse_options(OptimOptions, dict(optim), "method.optim")
        self.teacher_cfg = None if teacher is None else parse_options(TeacherOptions, dict(teacher), "method.teacher")
        student_cfg = dict(backbone)
        if student_drop_path is not None:
            student_cfg["drop_path_rate"] = student_drop_path
        self.student_backbone = Backbone(**student_cfg)
        self.crops_cfg = dict(crops or {})
        for key in ("global_size", "local_size", "size"):  # at start-up, not at the first step
            if key in self.crops_cfg:
                self.student_backbone.check_input_size(self.crops_cfg[key], f"method.crops.{key}")
        if teacher is not None:
            teacher_cfg = {**backbone, "weights": "none", "drop_path_rate": 0.0}
            self.teacher_backbone = make_teacher(self.student_backbone, Backbone(**teacher_cfg))
        if eval_on not in ("teacher", "student") or (eval_on == "teacher" and teacher is None):
            raise ValueError(f"eval_on={eval_on!r} needs a teacher; use 'student' for methods without one")
        self.eval_on = eval_on
        self.color = ColorAugment(**(color or {}))
        self.compile_cfg = compile
        dse_cfg = dict(dse_regularizer or {})
        self.dse_weight = float(dse_cfg.pop("weight", 0.0))
        self.dse_options = parse_options(DSEOptions, dse_cfg, "dse.regularizer")
        # Private generators (DSE k-means, reference sampling, ...) never touch the global RNG; they
        # are saved in checkpoints with the global RNG states for exact resume.
        self._generators: dict[str, torch.Generator] = {}
        self._pending_generator_states: dict[str, Tensor] = {}

    def configure_model(self) -> None:
        # nn.Module.compile works in place, so state-dict keys (checkpoints, exports) do not change.
        if self.compile_cfg is not None:
            for net in (self.student_backbone, getattr(self, "teacher_backbone", None)):
                if net is not None:
                    net.model.compile(**self.compile_cfg)

    # ------------------------------------------------------------------ networks
    @property
    def backbone(self) -> Backbone:
        return self.student_backbone

    @property
    def eval_backbone(self) -> Backbone:
        """The network evaluators, the DSE monitor and exports use."""
        return self.teacher_backbone if self.eval_on == "teacher" else self.student_backbone

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs updated by EMA after every optimiser step."""
        return [(self.student_backbone, self.teacher_backbone)] if self.teacher_cfg is not None else []

    def param_groups(self) -> list[tuple[str, nn.Module, float]]:
        """(name, module, lr) of every trained part; objectives add their heads."""
        return [("backbone", self.student_backbone, self.optim_cfg.lr)]

    def train_transform(self) -> Callable[[Any], Any]:
        """CPU-side view sampler applied to each PIL image by the data loader."""
        return MultiCropWithBoxes(**self.crops_cfg)

    collate_fn = staticmethod(collate_multicrop)

    # ------------------------------------------------------------------ the step
    def compute_loss(self, batch: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Colour augmentation on the batch's device: kornia on GPU in real runs, CPU in tests.
        if self._trainer is not None and self.trainer.training and isinstance(batch, dict) and "crops" in batch:
            batch["crops"] = [self.color(c) for c in batch["crops"]]
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms = self.compute_loss(batch)
        loss, dense = terms.pop("loss"), terms.pop("dense", None)
        if self.dse_weight > 0:
            if dense is None:
                raise ValueError(f"{type(self).__name__} does not expose dense student tokens for the DSE regularizer")
            reg = self.dse_term(dense)
            terms["dse_reg"] = reg.detach()
            terms["ssl_loss"] = loss.detach()
            loss = loss - self.dse_weight * reg
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, terms, dense)
        bs = batch["boxes"].shape[0] if isinstance(batch, dict) and "boxes" in batch else None
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def generator(self, name: str, device: torch.device, seed: int | None = None) -> torch.Generator:
        """A named private generator on ``device``, seeded once by (seed, name, rank); ``seed``
        defaults to the run's seed (``torch.initial_seed()`` after ``seed_everything``)."""
        seed = int(torch.initial_seed()) % 2**31 if seed is None else seed
        gen = self._generators.get(name)
        if gen is None or gen.device != torch.device(device):
            gen = torch.Generator(device=device)
            gen.manual_seed(seed + 1000 * self.global_rank + sum(map(ord, name)))
            pending = self._pending_generator_states.pop(name, None)
            if pending is not None:
                gen.set_state(pending)
            self._generators[name] = gen
        return gen

    def dse_term(self, dense: Tensor) -> Tensor:
        gen = self.generator("dse", dense.device, self.dse_options.seed)
        return dse_regularizer(dense, self.dse_options, generator=gen)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.fabric.utilities.seed import _collect_rng_states

        states = _collect_rng_states()
        # numpy's state holds an ndarray: store it as a tensor so weights_only loading accepts it.
        kind, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
        checkpoint["densessl_rng"] = {"global": states,
                                      "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.fabric.utilities.seed import _set_rng_states

        state = checkpoint.get("densessl_rng")
        if state is not None:
            states = dict(state["global"])
            kind, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (kind, keys.numpy().astype("uint32"), pos, has_gauss, cached)
            _set_rng_states(states)
            self._pending_generator_states = dict(state["generators"])

    def _raise_non_finite(self, loss: Tensor, terms: dict[str, Any], dense: Tensor | None) -> None:
        ckpt = None
        if self._trainer is not None and self.trainer.checkpoint_callback is not None:
            cb = self.trainer.checkpoint_callback
            ckpt = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") or None
        # Every scalar term of the step (tensors and plain numbers), and whether the student's tokens are
        # already non-finite (diverged weights) or only the loss is (its numerics).
        shown = {"loss": loss.item(), **{k: float(v) for k, v in terms.items()
                                         if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)}}
        if dense is not None:
            shown["student_tokens_nonfinite"] = round(float((~torch.isfinite(dense.detach())).float().mean()), 4)
        raise NonFiniteLossError(
            f"non-finite loss {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
            f"terms: {shown}. Last good checkpoint: {ckpt or 'none written yet'}. Lower the learning rate, "
            f"use trainer.precision=32 or bf16-mixed instead of 16-mixed, or enable gradient clipping "
            f"(trainer.gradient_clip_val), then resume from that checkpoint.")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.optim_cfg
        scale = 1.0
        if cfg.batch_size_scaling:
            scale = self.trainer.world_size * self._batch_size() / 256.0
        groups = []
        for name, module, lr in self.param_groups():
            decay, no_decay = [], []
            for pname, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                # No weight decay on biases and 1-D parameters (norms, layer scales, tokens' bias).
                (no_decay if p.ndim <= 1 or pname.endswith(".bias") else decay).append(p)
            for params, wd in ((decay, True), (no_decay, False)):
                if params:
                    # final_lr is absolute (DINO's min_lr is not batch-scaled), scaled per group by its lr ratio
                    final = cfg.final_lr * lr / cfg.lr if cfg.lr else 0.0
                    groups.append({"params": params, "name": f"{name}{'' if wd else '_no_decay'}",
                                   "base_lr": lr * scale, "final_lr": final, "apply_wd": wd,
                                   "weight_decay": cfg.weight_decay if wd else 0.0, "lr": lr * scale})
        name = cfg.name.lower()
        if name == "adamw":
            return torch.optim.AdamW(groups, betas=tuple(cfg.betas))
        if name == "sgd":
            return torch.optim.SGD(groups, momentum=cfg.momentum)
        raise ValueError(f"unknown optimiser '{name}' (method.optim.name: adamw | sgd)")

    def _batch_size(self) -> int:
        dm = self.trainer.datamodule
        return int(getattr(dm, "batch_size", 1)) if dm is not None else 1

    @property
    def total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    def steps_per_epoch(self) -> int:
        return max(self.total_steps // max(self.trainer.max_epochs or 1, 1), 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Per-step cosine lr (after linear warm-up) and cosine weight decay for every group."""
        cfg, step, total = self.optim_cfg, self.global_step, self.total_steps
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch())
        wd, final_wd = cfg.weight_decay, cfg.final_weight_decay
        if cfg.schedule == "constant":
            return
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = cosine_schedule(step, total, group["base_lr"], group["final_lr"], warmup)
            if group["apply_wd"]:
                group["weight_decay"] = cosine_schedule(step, total, wd, final_wd)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # EMA right after the update (as DINO), once per optimiser step (not per accumulated
        # micro-batch). Here rather than in on_train_batch_end, which runs after the callbacks' hook:
        # a checkpoint written there (periodic, or on a stop signal) must already hold this step's
        # teacher. (NeCo's reference updates inside training_step, i.e. before the step: one step of lag.)
        super().optimizer_step(*args, **kwargs)
        if self.teacher_cfg is not None:  # global_step still counts the steps before this one
            m = self.momentum_at(self.global_step)
            ema_update(self.momentum_pairs(), m)
            self.log("train/momentum", m)

    def momentum_at(self, step: int) -> float:
        cfg = self.teacher_cfg
        return cosine_momentum(step, self.total_steps, cfg.momentum, cfg.final_momentum)

    # ------------------------------------------------------------------ export
    def export_backbone(self, path: str, layout: str = "timm") -> None:
        torch.save(self.eval_backbone.export_state_dict(layout), path)
