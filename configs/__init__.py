"""attnzoo's Hydra configs, shipped as package data (``pkg://attnzoo.configs``).

Importing the package also registers ``attnzoo_open_nodes`` in Hydra's ConfigStore, the first entry of train.yaml's
defaults list. It creates the ``model``, ``attention``, ``data``, ``optimizer``, ``scheduler`` and ``trainer`` nodes
with Hydra's struct flag off, so any key of theirs can be set from the command line without ``+``
(``trainer.fast_dev_run=true``, like every other ``lightning.Trainer`` argument). A misspelled key is then caught by
``attnzoo.training.validate``, which checks every key and value of these nodes against the callable they feed and
names the closest valid key; every other node keeps Hydra's struct mode. A YAML file cannot carry that flag, hence
the ConfigStore node.
"""

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

OPEN_NODES = ("model", "attention", "data", "optimizer", "scheduler", "trainer")


def _open_nodes() -> DictConfig:
    nodes = OmegaConf.create({name: {} for name in OPEN_NODES})
    for name in OPEN_NODES:
        OmegaConf.set_struct(nodes[name], False)  # kept through Hydra's merges and its root-level set_struct(True)
    return nodes


ConfigStore.instance().store(name="attnzoo_open_nodes", node=_open_nodes())
