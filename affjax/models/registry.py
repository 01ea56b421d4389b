"""The registry of ported models: one :class:`ModelSpec` per torchvision name.

A family file (``affjax/models/<family>.py``) defines its linen modules and calls
:func:`register` once per model name at import time. Every public module of the
``affjax.models`` package is imported the first time the registry is read, so a new family
needs no other edit. See ``docs/models.md`` for the conventions.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from affjax.models.transforms import EvalTransform


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one Flax variable leaf is read from (and written to) one torch tensor.

    Attributes:
      torch_key: the torchvision state-dict name, e.g. ``"layer1.0.conv1.weight"``.
      torch_shape: the shape torch stores (checked before ``to_flax`` runs).
      to_flax: torch array -> Flax leaf (e.g. the OIHW -> HWIO transpose).
      to_torch: the inverse, for :func:`affjax.models.to_torchvision`.
    """

    torch_key: str
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


# (collection, module path, leaf name, Flax leaf shape) -> a Rule, or None for the default.
RuleFn = Callable[[str, tuple[str, ...], str, tuple[int, ...]], "Rule | None"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the zoo needs to know about one model name.

    Attributes:
      name: torchvision's name (``"resnet18"``).
      family: the family file's name (``"resnet"``).
      build: ``build(num_classes=..., **kw) -> nn.Module``; ``kw`` are the module's fields
        (``activation=...``, ``dropout=...``).
      transform: the evaluation transform of torchvision's default weights.
      head: torch module name of the final classifier Linear (``"fc"``); ``from_torchvision``
        reads ``num_classes`` from its weight.
      min_size: the smallest square input side the architecture accepts; ``create`` initialises
        at this size (parameter shapes do not depend on it: adaptive pooling before the head).
      parity_size: the input side of the parity sweep (``tools/parity.py``): small, but
        large enough that the maps before the head are larger than 1x1, so that the flatten
        permutation and the adaptive pooling are exercised.
      flatten: torch Linear name -> ``(H, W, C)`` of the NHWC map flattened into it. torch
        flattens NCHW, the port flattens NHWC, so that Linear's input rows are permuted.
      rules: optional per-leaf override (``RuleFn``) for tensors the default mapping cannot
        express (fused attention projections, class tokens with another layout, ...).
      torch_module: optional mapping from a Flax module path to the torch module name; the
        default joins the path with ``"."`` (Flax modules are named after torch's).
      size_argument: for models whose parameter shapes depend on the input side (ViT's
        position embedding), the name of the constructor argument giving it (``"image_size"``)
        in both torchvision and the port. Initialisation then uses that side instead of
        ``min_size``, and the parity check passes the input side to both constructors.
      ignored_prefixes: torch state-dict names starting with one of these are accepted and
        not converted (GoogLeNet's and Inception v3's auxiliary heads, which pretrained
        weights files contain but which only run in training).
      torchvision_kwargs: the torchvision constructor options that the default weights set
        (``transform_input=True`` for GoogLeNet and Inception v3); the parity reference builds
        torchvision's model with them.
    """

    name: str
    family: str
    build: Callable[..., nn.Module]
    transform: EvalTransform
    head: str
    min_size: int = 32
    parity_size: int = 64
    flatten: Mapping[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    rules: RuleFn | None = None
    torch_module: Callable[[tuple[str, ...]], str] | None = None
    ignored_prefixes: tuple[str, ...] = ()
    torchvision_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    size_argument: str | None = None

    def init_size(self, module: nn.Module) -> int:
        """The square input side at which ``module`` (built from this spec) is initialised."""
        return int(getattr(module, self.size_argument)) if self.size_argument else self.min_size

    def torch_prefix(self, path: tuple[str, ...]) -> str:
        return self.torch_module(path) if self.torch_module else ".".join(path)


_SPECS: dict[str, ModelSpec] = {}
_LOADED = False
# Infrastructure modules of the package; every other public module is a family file.
_INFRASTRUCTURE = frozenset({"convert", "io", "layers", "registry", "transforms"})


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the zoo (called by family files at import time).

    Example:
      >>> register(ModelSpec(name="my_net", family="mine", build=MyNet,   # doctest: +SKIP
      ...                    transform=EvalTransform(256, 224), head="fc"))
    """
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"model {spec.name!r} is registered twice "
                         f"(families {_SPECS[spec.name].family!r} and {spec.family!r})")
    _SPECS[spec.name] = spec
    return spec


def _load_families() -> None:
    global _LOADED
    if _LOADED:
        return
    import affjax.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name not in _INFRASTRUCTURE:
            importlib.import_module(f"affjax.models.{info.name}")
    _LOADED = True


def list_models() -> list[str]:
    """The ported model names (torchvision's), sorted.

    Example:
      >>> "resnet18" in list_models()
      True
    """
    _load_families()
    return sorted(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; ``ValueError`` listing the valid names otherwise.

    Example:
      >>> get_spec("resnet18").transform.crop_size   # doctest: +SKIP
      224
    """
    _load_families()
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; ported models are: {', '.join(sorted(_SPECS))}")
    return _SPECS[name]


def build_module(spec: ModelSpec, num_classes: int, kw: Mapping[str, Any]) -> nn.Module:
    """``spec.build`` with an error naming the model and its options on a bad keyword."""
    # NumPy integers are integers; True is not a class count (bool subclasses int).
    if (isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer)
            or num_classes < 1):
        raise ValueError(f"{spec.name}: num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    try:
        return spec.build(num_classes=num_classes, **kw)
    except TypeError as e:
        module = spec.build(num_classes=num_classes)
        options = sorted(f.name for f in dataclasses.fields(module)
                         if f.name not in ("parent", "name"))
        raise TypeError(f"{spec.name}: bad option in {sorted(kw)} ({e}); options are "
                        f"{options}") from None
