"""attnzoo.models: backbones that take any registered attention (a name, a spec, or one spec per layer)."""

from attnzoo.models.gpt import GPT
from attnzoo.models.specs import per_layer

__all__ = ["GPT", "per_layer"]
