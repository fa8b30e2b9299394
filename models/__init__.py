"""attnzoo.models: backbones that take any registered attention (a name, a spec, or one spec per layer)."""

from attnzoo.models.gpt import GPT
from attnzoo.models.io import load_checkpoint, load_weights, save_weights
from attnzoo.models.specs import per_layer

__all__ = ["GPT", "load_checkpoint", "load_weights", "per_layer", "save_weights"]
