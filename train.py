"""Train a model from the Hydra configs in configs/: ``python train.py [overrides]`` (see README.md)."""

import hydra
from omegaconf import DictConfig

import attnzoo.training


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return attnzoo.training.run(cfg)


if __name__ == "__main__":
    main()
