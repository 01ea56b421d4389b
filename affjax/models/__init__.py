"""Flax (linen) ports of torchvision's ImageNet classifiers, with torchvision weight import.

Every activation is an :class:`affjax.Activation` called in torchvision's order, so
``affjax.signature(module, variables, x)`` gives the model's non-linearity signature with
names that map one to one onto torchvision's activation modules (``layer1.0/relu:1`` is the
second call of torch's ``layer1.0.relu``). Conventions for adding a family:
``docs/models.md``.

Example:
  >>> from affjax import models
  >>> module, variables = models.create("resnet18")
  >>> x = models.eval_transform("resnet18")(images_uint8_nhwc)   # doctest: +SKIP
  >>> logits = module.apply(variables, x)                        # doctest: +SKIP
"""

from affjax.models.convert import create
from affjax.models.convert import eval_transform
from affjax.models.convert import from_torchvision
from affjax.models.convert import to_torchvision
from affjax.models.io import load_safetensors
from affjax.models.io import load_state_dict
from affjax.models.io import save_safetensors
from affjax.models.registry import ModelSpec
from affjax.models.registry import Rule
from affjax.models.registry import get_spec
from affjax.models.registry import list_models
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

__all__ = [
    "EvalTransform",
    "ModelSpec",
    "Rule",
    "create",
    "eval_transform",
    "from_torchvision",
    "get_spec",
    "list_models",
    "load_safetensors",
    "load_state_dict",
    "register",
    "save_safetensors",
    "to_torchvision",
]
