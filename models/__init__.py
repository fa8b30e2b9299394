"""attnzoo.models: backbones that take any registered attention (a name, a spec, or one spec per layer)."""

from attnzoo.models.gpt import GPT
from attnzoo.models.io import load_checkpoint, load_weights, save_weights
from attnzoo.models.specs import per_layer

# backbone name (the model config's ``name``) -> class; each class says which training task fits it (``task``)
MODELS: dict[str, type] = {
    "gpt": GPT,
}

__all__ = ["GPT", "MODELS", "load_checkpoint", "load_weights", "per_layer", "save_weights"]
