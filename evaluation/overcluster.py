"""Overclustering of frozen patch tokens on a labelled split.

  python evaluation/overcluster.py backbone=dinov2_vits14 backbone.weights=hub data=voc data.root=/data/VOC2012
  python evaluation/overcluster.py weights=runs/2026-11-23/12-00-00_neco data=synthetic eval.ks=[7,20,50]
"""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from densessl.data.datamodule import prepare_root
from densessl.evaluation.protocols import evaluate_overclustering, load_backbone, write_results
from densessl.training import exit_on_user_error


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    prepare_root(cfg.data)
    backbone = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True), cfg.weights).to(cfg.device)
    dataset = hydra.utils.instantiate(cfg.data.val)
    opts = OmegaConf.to_container(cfg.eval, resolve=True)
    opts.pop("name")
    result = evaluate_overclustering(backbone, dataset, device=cfg.device, **opts)
    write_results(Path(HydraConfig.get().runtime.output_dir), "overcluster", result.as_dict(), result.table())


if __name__ == "__main__":
    main()
