"""attnzoo.models: backbones that take any registered attention (a name, a spec, or one spec per layer)."""

from attnzoo.models import timm_models  # noqa: F401  registers attnzoo_vit_* with timm.create_model
from attnzoo.models.encoder import Encoder
from attnzoo.models.gpt import GPT
from attnzoo.models.io import load_checkpoint, load_weights, save_weights

# the function shadows its module as an attribute of the package (as ``attnzoo.models.swap`` would if it were
# re-exported under its own name): ``from attnzoo.models.linearize import attention_transfer`` still finds the module
# through sys.modules; ``importlib.import_module("attnzoo.models.linearize")`` returns the module itself
from attnzoo.models.linearize import LinearizeReport, linearize
from attnzoo.models.seq2seq import Seq2Seq
from attnzoo.models.specs import per_layer
from attnzoo.models.swap import SwapReport, swap_attention
from attnzoo.models.vit import ViT, timm_attention_class

# backbone name (the model config's ``name``) -> class; each class says which training task fits it (``task``)
MODELS: dict[str, type] = {
    "gpt": GPT,
    "vit": ViT,
    "encoder": Encoder,
    "seq2seq": Seq2Seq,
}

__all__ = [
    "GPT",
    "MODELS",
    "Encoder",
    "LinearizeReport",
    "Seq2Seq",
    "SwapReport",
    "ViT",
    "linearize",
    "load_checkpoint",
    "load_weights",
    "per_layer",
    "save_weights",
    "swap_attention",
    "timm_attention_class",
]
