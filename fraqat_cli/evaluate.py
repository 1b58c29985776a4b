"""`fraqat-eval`: FID and CLIP score of a quantized student against its teacher."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="pkg://fraqat_cli.conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
