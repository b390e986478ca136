"""Train a dense SSL objective: python experiments/train.py [+experiment=NAME] [overrides...]

Examples:
  python experiments/train.py +experiment=quickstart
  python experiments/train.py +experiment=neco_dinov2 data.root=/data/coco data.voc_root=/data/VOC2012
  python experiments/train.py +experiment=neco_dinov2 backbone.weights=none data=synthetic trainer=cpu
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from densessl.cli import exit_on_user_error
from densessl.slurm import require_launcher_plugin
from densessl.training import format_summary, save_config, train


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    save_config(cfg, run_dir)
    summary = train(cfg, run_dir)
    print("\n" + format_summary(summary), flush=True)


if __name__ == "__main__":
    require_launcher_plugin(sys.argv[1:])
    main()
