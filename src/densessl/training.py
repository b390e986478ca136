"""The training run behind ``experiments/train.py``: compose -> instantiate -> fit -> export."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

import densessl.slurm  # noqa: F401  registers the resolvers that configs/train.yaml and trainer=ddp use
from densessl.data.datamodule import SSLDataModule, prepare_root
from densessl.data.datasets import skipped_files
from densessl.options import check_keys, parse_options

log = logging.getLogger("densessl")


def build_method(cfg: DictConfig) -> L.LightningModule:
    """Instantiate ``cfg.method`` (its ``_target_``) with the backbone and DSE-regularizer configs."""
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method_cfg.pop("name", None)
    return hydra.utils.instantiate(method_cfg, backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
                                   dse_regularizer=OmegaConf.to_container(cfg.dse.regularizer, resolve=True),
                                   _recursive_=False, _convert_="all")


def build_dataset(cfg: DictConfig, split: str) -> Any:
    node = cfg.data.get(split)
    if node is None:
        raise ValueError(f"data={cfg.data.name} has no '{split}' dataset; set data.{split} or pick another data config")
    return hydra.utils.instantiate(node)


# Keys that do not define an experiment: a relaunch that changes them continues the same run folder.
AUTO_RUN_IGNORES = ("hydra", "resume", "trainer.max_epochs", "trainer.max_steps")


def config_hash(cfg: DictConfig) -> str:
    """8 hex digits of the composed config minus AUTO_RUN_IGNORES. Interpolations stay unresolved:
    some point into Hydra's runtime, which is not set while the run folder is being chosen."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    for key in AUTO_RUN_IGNORES:
        *parents, leaf = key.split(".")
        node = functools.reduce(lambda d, k: d.get(k, {}) if isinstance(d, dict) else {}, parents, tree)
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_folder(default: str, *, _root_: DictConfig) -> str:
    """``hydra.run.dir``: ``default`` (timestamped), or with resume=auto runs/auto/<method>_<config_hash>,
    the same folder for every launch of the same command, so that a relaunch finds its checkpoints."""
    if _root_.get("resume") != "auto":
        return default
    return f"runs/auto/{_root_.method.name}_{config_hash(_root_)}"


if not OmegaConf.has_resolver("densessl.run_folder"):
    OmegaConf.register_new_resolver("densessl.run_folder", run_folder)


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """A checkpoint file, a run folder (its checkpoints/last.ckpt), or 'auto': this run folder's
    last.ckpt, else its newest checkpoint, else None (nothing to resume)."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        folder = run_dir / "checkpoints"
        found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
        return str(found[-1]) if found else None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume!r}: no checkpoint at {path}. Pass a .ckpt file or a run folder "
                                f"that contains checkpoints/last.ckpt.")
    return str(path)


def check_resume_checkpoint(path: str, model: L.LightningModule, world_size: int = 1) -> int:
    """The checkpoint's global step. Fails before training, with the file named, when a checkpoint is
    unreadable or belongs to another model (never a silent restart from scratch), or was written
    mid-epoch by a run on another number of processes than ``world_size`` (its loader position counts
    batches per rank: resumed on another world size, images of that epoch would be skipped or repeated)."""
    import torch

    others = sorted(str(p.name) for p in Path(path).parent.glob("*.ckpt") if str(p) != path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        state = checkpoint["state_dict"]
        keys = set(state)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path} ({type(err).__name__}: {err}). It may be truncated "
                         f"(a job killed while writing it); resume from another checkpoint of that run: "
                         f"{others or 'none found'}") from err
    own = model.state_dict()
    shapes = sorted(k for k in keys & set(own) if state[k].shape != own[k].shape)
    if keys != set(own) or shapes:
        raise ValueError(f"checkpoint {path} does not match this model: missing {sorted(set(own) - keys)[:5]}, "
                         f"unexpected {sorted(keys - set(own))[:5]}, other shapes {shapes[:5]}. Resume with the "
                         f"same method/backbone config as the run that wrote it (its config.yaml).")
    data = checkpoint.get("SSLDataModule") or {}
    if data.get("batches", 0) > 0 and data.get("world", world_size) != world_size:
        raise ValueError(f"checkpoint {path} was written mid-epoch (batch {data['batches']} of epoch {data['epoch']}) "
                         f"by a run on {data['world']} process(es); this run has {world_size} (trainer.devices x "
                         f"trainer.num_nodes). Resume it with trainer.devices/trainer.num_nodes giving "
                         f"{data['world']} processes, or resume from an epoch-end checkpoint of that run "
                         f"({[n for n in others if n.startswith('epoch')] or 'none found'}), which any number of "
                         f"processes can continue.")
    return int(checkpoint.get("global_step", 0))


def check_trainer(options: dict[str, Any]) -> None:
    """``trainer.*`` options that Lightning would reject late or with a traceback: unknown keys (e.g.
    through Hydra's ``+trainer.key=`` hint) and a GPU accelerator on a machine without one."""
    import inspect

    import torch

    ours = ("self", "logger", "callbacks", "default_root_dir")  # set by train() from other config groups
    valid = [k for k in inspect.signature(L.Trainer.__init__).parameters if k not in ours]
    check_keys(options, valid, "trainer", "see the arguments of lightning.Trainer (loggers and callbacks "
                                          "come from the logger= and callbacks= groups)")
    if str(options.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={options['accelerator']} (trainer=gpu/ddp) but this machine has no "
                         f"usable CUDA GPU (torch.cuda.is_available() is False): train on the CPU with trainer=cpu, "
                         f"or keep the DDP strategy with trainer.accelerator=cpu trainer.devices=<processes>.")


def check_eval_sizes(cfg: DictConfig, backbone: Any) -> None:
    """Every evaluation input size that training will use is a multiple of the patch size: checked at
    start-up, naming the key the user sets (``overcluster.image_size`` when a callback interpolates it)."""
    sizes = [("overcluster.image_size", cfg.overcluster.image_size)] if cfg.eval_before_after else []
    for name, node in (cfg.callbacks or {}).items():
        if node is not None and "image_size" in node:
            raw = OmegaConf.to_container(node, resolve=False)["image_size"]
            key = raw[2:-1] if isinstance(raw, str) and raw.startswith("${") else f"callbacks.{name}.image_size"
            sizes.append((key, node.image_size))
    for key, size in sizes:
        backbone.check_input_size(size, key)


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys (``method.optim.lr``), as every logger shows them alike;
    lists and scalars are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data``; returns a summary dict (paths, before/after figures)."""
    import torch
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from densessl.callbacks import AtomicCheckpointIO, DenseEvalCallback, ProgressBar
    from densessl.callbacks.preemption import ignore_stop_signals
    from densessl.evaluation.overcluster import OverclusterOptions
    from densessl.evaluation.pictures import log_picture, result_panels
    from densessl.evaluation.protocols import evaluate_overclustering
    from densessl.loggers import NeptuneLogger

    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_trainer(trainer_options)
    if isinstance(trainer_options.get("strategy"), dict):  # a strategy with options (trainer=fsdp)
        trainer_options["strategy"] = hydra.utils.instantiate(trainer_options["strategy"])
    L.seed_everything(cfg.seed, workers=True)
    prepare_root(cfg.data)
    # Datasets first: a wrong data root is the likelier mistake and is reported before other config errors.
    train_set = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val") if cfg.eval_before_after else None
    model = build_method(cfg)
    check_eval_sizes(cfg, model.eval_backbone)
    overcluster_options = parse_options(OverclusterOptions, OmegaConf.to_container(cfg.overcluster, resolve=True),
                                        "overcluster")
    # Pinned batches make Lightning's non_blocking copy to the GPU asynchronous (NeCo's 2 x 518 + 4 x 98
    # uint8 crops are ~110 MB per batch of 64).
    pin_memory = str(trainer_options.get("accelerator", "auto")) != "cpu" and torch.cuda.is_available()
    dm = SSLDataModule(train_set, model.train_transform(), model.collate_fn, batch_size=cfg.data.batch_size,
                       num_workers=cfg.data.num_workers, max_images=cfg.data.max_images, pin_memory=pin_memory,
                       seed=cfg.seed, worker_init_fn=ignore_stop_signals, with_labels=model.uses_labels)

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # file-backed stores (MLflow's SQLite) open it first
    loggers = [hydra.utils.instantiate(c) for c in (cfg.logger or {}).values()]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    if trainer_options.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(ProgressBar())  # Lightning's, without v_num
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # requeueing is PreemptionCheckpoint's, at a step boundary (see there)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    # The datamodule's sampler shards the data across ranks itself and is resumable mid-epoch.
    trainer = L.Trainer(**trainer_options, logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir),
                        plugins=plugins, use_distributed_sampler=False)
    # The whole config, once, with dotted keys (the method's own arguments are part of it and are not
    # logged again: SSLMethod.save_hyperparameters(logger=False)).
    hparams = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    for lg in loggers:
        lg.log_hyperparams(hparams)

    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    if val is not None:
        summary["before"] = evaluate_overclustering(model.eval_backbone, val, overcluster_options)
    ckpt = resolve_resume(cfg.resume, run_dir)
    if ckpt is not None:
        print(f"resuming from {ckpt} (step {check_resume_checkpoint(ckpt, model, trainer.world_size)})", flush=True)
    elif cfg.resume == "auto":
        print(f"resume=auto: nothing to resume in {run_dir / 'checkpoints'}, starting from scratch", flush=True)
    # Lightning warns on a mid-epoch resume unless the DataLoader itself is stateful; here the
    # datamodule's checkpointed state restores the loader's position.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # A false positive: Lightning names the hook it runs whenever a LightningModule overrides it and a
    # LightningDataModule is passed, even when the datamodule does not override it (no ambiguity). The
    # methods' on_after_batch_transfer (colour augmentation on the device) is the one meant to run.
    warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule` "
                                              "but have passed in a `LightningDataModule`")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    summary["train_seconds"] = time.perf_counter() - start
    if val is not None:
        summary["after"] = evaluate_overclustering(model.eval_backbone, val, overcluster_options)
        if trainer.is_global_zero:
            # The after panel also shows the final predictions of the evaluation callbacks (linear,
            # retrieval) on the same val images: image | ground truth | overcluster | linear | retrieval.
            final = [cb.last for cb in callbacks if isinstance(cb, DenseEvalCallback) and cb.last is not None]
            for when in ("before", "after"):
                metrics = {f"overcluster_{when}/{k}": v for k, v in summary[when].as_dict().items()}
                shown = [summary[when], *final] if when == "after" else summary[when]
                picture = result_panels(shown, val, run_dir / "pictures" / f"overcluster_{when}.png",
                                        title=f"{cfg.method.name} {when} training")
                for lg in loggers:
                    lg.log_metrics(metrics, step=trainer.global_step)
                if picture is not None:
                    log_picture(loggers, f"pictures/overcluster_{when}", picture, trainer.global_step)
                    summary[f"picture_{when}"] = str(picture)
            for lg in loggers:
                lg.save()

    summary["skipped_images"] = [str(p) for d in (dm.dataset, val) for p in skipped_files(d)]  # after every read
    figures: dict[str, float] = {"train_seconds": summary["train_seconds"], "steps": float(trainer.global_step),
                                 "skipped_images": float(len(summary["skipped_images"]))}
    loss = trainer.callback_metrics.get("train/loss")
    if loss is not None:
        figures["final_train_loss"] = float(loss)
    for when in ("before", "after"):
        if when in summary:
            figures.update({f"overcluster_{when}_{k}": v for k, v in summary[when].as_dict().items() if "seed" not in k})
    if trainer.is_global_zero:  # read by the multirun summary (densessl.sweep)
        (run_dir / "summary.json").write_text(json.dumps(figures, indent=2))

    export = run_dir / "backbone.pth"
    export_eval_backbone(trainer, model, export, cfg.export.layout)
    for lg in loggers:  # the one Neptune run of this training, open since fit for the figures above
        if isinstance(lg, NeptuneLogger):
            lg.close()
    summary.update(checkpoints=str(run_dir / "checkpoints"), logs=str(run_dir / "logs"),
                   config=str(run_dir / "config.yaml"), backbone=str(export))
    return summary


def export_eval_backbone(trainer: L.Trainer, model: L.LightningModule, path: Path, layout: str) -> None:
    """``model.eval_backbone``'s export, written by rank 0. Under FSDP its weights are sharded: every
    rank takes part in gathering the full state dict (Lightning's; rank 0 receives it)."""
    import torch
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        if trainer.is_global_zero:
            model.export_backbone(str(path), layout=layout)
        return
    full = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        name = next(n for n, m in model.named_modules() if m is model.eval_backbone)
        prefix = f"{name}.model."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        torch.save(model.eval_backbone.export_state_dict(layout, state=state), path)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run folder     : {summary['run_dir']}",
             f"checkpoints    : {summary['checkpoints']}",
             f"logs           : {summary['logs']}",
             f"resolved config: {summary['config']}",
             f"backbone export: {summary['backbone']}",
             f"training time  : {summary['train_seconds']:.0f} s"]
    skipped = summary.get("skipped_images")
    if skipped:
        lines.append(f"skipped images : {len(skipped)} that do not decode (data.on_bad_image=skip; each named in the "
                     f"log): {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}")
    if "picture_after" in summary:
        lines.append(f"pictures       : {summary['picture_before']}, {summary['picture_after']}")
    if "before" in summary:
        before, after = summary["before"], summary["after"]
        lines.append("")
        lines.append("overclustering mIoU (%) on data.val, mean +- std over seeds")
        lines.append(f"{'K':>6} | {'before':>14} | {'after':>14} | {'change':>7}")
        for k in before.miou:
            b_m, b_s = before.mean(k) * 100, before.std(k) * 100
            a_m, a_s = after.mean(k) * 100, after.std(k) * 100
            lines.append(f"{k:>6} | {b_m:7.2f} +- {b_s:4.2f} | {a_m:7.2f} +- {a_s:4.2f} | {a_m - b_m:+7.2f}")
    return "\n".join(lines)


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
