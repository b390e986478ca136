"""The body of the evaluation CLIs: one backbone, one labelled dataset, one evaluator from the
``eval`` config group, figures written as JSON/CSV next to the run."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from densessl.data.datamodule import prepare_root
from densessl.evaluation.pictures import result_panels
from densessl.evaluation.protocols import load_backbone, write_results


def run_evaluation(cfg: DictConfig, out_dir: Path) -> object:
    prepare_root(cfg.data)
    backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), cfg.weights).to(cfg.device)
    if "image_size" in cfg.eval.options:
        backbone.check_input_size(cfg.eval.options.image_size, "eval.options.image_size")
    val = hydra.utils.instantiate(cfg.data.val)
    evaluator = hydra.utils.get_method(cfg.eval.evaluator)
    options = OmegaConf.to_container(cfg.eval.options, resolve=True)
    if cfg.eval.uses_train_split:
        train = hydra.utils.instantiate(cfg.data.val, split=cfg.data.seg_train_split)
        result = evaluator(backbone, train, val, device=cfg.device, **options)
    else:
        result = evaluator(backbone, val, device=cfg.device, **options)
    figures = result.as_dict()
    table = result.table() if hasattr(result, "table") else "\n".join(f"{k:<32} {v:.4f}" for k, v in figures.items())
    write_results(out_dir, cfg.eval.name, figures, table)
    picture = result_panels(result, val, out_dir / f"{cfg.eval.name}.png", title=cfg.eval.name)
    if picture is not None:  # evaluators that kept pictures (options.num_vis > 0)
        print(f"pictures: {picture}")
    return result
