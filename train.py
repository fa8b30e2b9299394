"""Train a model from the Hydra configs in configs/: ``python train.py [overrides]`` (see README.md).

The same function as the installed ``attnzoo-train`` command (``attnzoo.cli.train``).
"""

from attnzoo.cli import train

if __name__ == "__main__":
    train()
