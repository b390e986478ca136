"""DSE of a backbone, or the DSE curve of every checkpoint of a training run with label-free
model selection.

  python evaluation/dse.py backbone=dinov2_vits14 backbone.weights=hub data=imagefolder data.root=/data/imagenet/train
  python evaluation/dse.py weights=runs/<date>/<run> data=synthetic eval.options.num_images=256
Options: configs/eval/dse.yaml. With weights=<run folder> the curve goes to <run folder>/eval/dse/<date>_<time>/.
"""
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from densessl.cli import exit_on_user_error
from densessl.data.datamodule import prepare_root
from densessl.evaluation.dse_cli import TERMS, format_candidates, run_checkpoints, write_curve
from densessl.evaluation.protocols import evaluate_dse, load_backbone, parse_dse_protocol, write_results
from densessl.evaluation.runtime import progress_bar, resolve_device

logger = logging.getLogger("densessl.evaluation.dse")


@hydra.main(config_path="../configs", config_name="evaluate_dse", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    prepare_root(cfg.data)
    dataset = hydra.utils.instantiate(cfg.data[cfg.eval.split])
    options = OmegaConf.to_container(cfg.eval.options, resolve=True)
    progress = bool(options.pop("progress", True))
    dse_options, sampling = parse_dse_protocol(options, "eval.options")
    logger.info("dse on %s, output %s", device, out_dir)
    run = Path(cfg.weights).expanduser() if cfg.weights else None
    if run is None or not run.is_dir():
        backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), cfg.weights).to(device)
        result = evaluate_dse(backbone, dataset, dse_options, device=device, progress=progress, **sampling)
        write_results(out_dir, "dse", result.as_dict(), "\n".join(f"{k:<12} {v:.4f}" for k, v in result.as_dict().items()))
        return
    backbone_cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").backbone, resolve=True)
    rows = []
    checkpoints = progress_bar(run_checkpoints(run), enabled=progress, desc="DSE over checkpoints", unit="ckpt")
    for step, ckpt in checkpoints:
        # One bar, over checkpoints: a features bar per checkpoint would flicker in and out.
        result = evaluate_dse(load_backbone(backbone_cfg, str(ckpt)).to(device), dataset, dse_options, device=device,
                              **sampling)
        rows.append({"step": step, "checkpoint": ckpt.name, **{t: getattr(result, t) for t in TERMS}})
        logger.info("%s: %s", ckpt.name, ", ".join(f"{t}={getattr(result, t):.4f}" for t in TERMS))
    picks = write_curve(rows, out_dir)
    logger.info("%s", format_candidates(rows, picks))
    logger.info("\ncurve: %s and %s", out_dir / "dse_curve.csv", out_dir / "dse_curve.png")


if __name__ == "__main__":
    main()
