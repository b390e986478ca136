"""Dense nearest-neighbour retrieval (Hummingbird) with frozen patch tokens.

  python evaluation/retrieval.py backbone=dinov2_vits14 backbone.weights=hub data=voc data.root=/data/VOC2012
  python evaluation/retrieval.py weights=runs/<date>/<run> data=synthetic      # a densessl training run
Options: configs/eval/retrieval.yaml (eval.options.*); shared root: configs/evaluate.yaml.
"""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from densessl.cli import exit_on_user_error
from densessl.evaluation.cli import run_evaluation


@hydra.main(config_path="../configs", config_name="evaluate_retrieval", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
