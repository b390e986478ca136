"""The body of the evaluation CLIs: one backbone, one labelled dataset, one evaluator from the
``eval`` config group, figures written as JSON/CSV in the Hydra output folder (next to the evaluated
run when ``weights`` is a run folder: ``densessl.evaluation.runtime.eval_folder``)."""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from densessl.data.datamodule import prepare_root
from densessl.evaluation.pictures import result_panels
from densessl.evaluation.protocols import load_backbone, write_results
from densessl.evaluation.runtime import resolve_device, resolve_faiss_gpu

logger = logging.getLogger(__name__)


def run_evaluation(cfg: DictConfig, out_dir: Path) -> object:
    device = resolve_device(cfg.device)
    prepare_root(cfg.data)
    backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), cfg.weights).to(device)
    if "image_size" in cfg.eval.options:
        backbone.check_input_size(cfg.eval.options.image_size, "eval.options.image_size")
    val = hydra.utils.instantiate(cfg.data.val)
    evaluator = hydra.utils.get_method(cfg.eval.evaluator)
    options = OmegaConf.to_container(cfg.eval.options, resolve=True)
    if "gpu" in options:
        options["gpu"] = resolve_faiss_gpu(options["gpu"], device)
    logger.info("%s on %s (faiss on %s), output %s", cfg.eval.name, device,
                "the GPU" if options.get("gpu") else "the CPU", out_dir)
    if cfg.eval.uses_train_split:
        train = hydra.utils.instantiate(cfg.data.val, split=cfg.data.seg_train_split)
        result = evaluator(backbone, train, val, device=device, **options)
    else:
        result = evaluator(backbone, val, device=device, **options)
    figures = result.as_dict()
    table = result.table() if hasattr(result, "table") else "\n".join(f"{k:<32} {v:.4f}" for k, v in figures.items())
    write_results(out_dir, cfg.eval.name, figures, table)
    picture = result_panels(result, val, out_dir / f"{cfg.eval.name}.png", title=cfg.eval.name)
    if picture is not None:  # evaluators that kept pictures (options.num_vis > 0)
        logger.info("pictures: %s", picture)
    return result
