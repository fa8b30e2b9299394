"""attnzoo: a registry of attention layers with one contract, and the backbones, data and training around them.

The subpackages are independent entry points: ``attnzoo.layers`` and ``attnzoo.kernels`` need only torch;
``attnzoo.models`` adds timm; ``attnzoo.data`` and ``attnzoo.training`` add Lightning and Hydra.
"""

__version__ = "0.1.0"
