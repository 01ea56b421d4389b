"""Random initialisation and torchvision weight import for the registered models.

The mapping from a Flax variable to a torchvision tensor is generic (``docs/models.md``):
Flax modules carry torch's module names, so a leaf at module path ``("layer1.0", "conv1")``
is read from ``layer1.0.conv1.<torch leaf>``, the torch leaf and layout following from the
Flax leaf:

=====================  ======================  =====================================
Flax collection/leaf   torch leaf              layout
=====================  ======================  =====================================
params/kernel (4-D)    weight                  OIHW -> HWIO (``transpose(2, 3, 1, 0)``)
params/kernel (3-D)    weight                  OIK -> KIO (Conv1d)
params/kernel (2-D)    weight                  (out, in) -> (in, out); rows permuted
                                               CHW -> HWC for a Linear in ``spec.flatten``
params/scale           weight                  as is (BatchNorm, LayerNorm)
params/bias            bias                    as is
batch_stats/mean       running_mean            as is
batch_stats/var        running_var             as is
params/<other>         <other>                 as is (class tokens, positional embeddings)
=====================  ======================  =====================================

``*.num_batches_tracked`` tensors are accepted and ignored, and so are tensors under a
spec's ``ignored_prefixes`` (auxiliary heads). A family overrides single leaves with
``ModelSpec.rules``.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from affjax.models import io
from affjax.models.registry import ModelSpec
from affjax.models.registry import Rule
from affjax.models.registry import build_module
from affjax.models.registry import get_spec
from affjax.models.transforms import EvalTransform

# Buffers the ports recompute rather than read: BatchNorm's counter, Swin's fixed
# relative-position index and (V2) coordinate table (functions of the window size).
_IGNORED_SUFFIXES = ("num_batches_tracked", "relative_position_index", "relative_coords_table")
_SHOW = 5  # names listed per kind of mismatch in error messages


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _flatten_rule(key: str, shape: tuple[int, ...], hwc: tuple[int, int, int]) -> Rule:
    h, w, c = hwc
    n_in, n_out = shape
    if h * w * c != n_in:
        raise ValueError(f"flatten spec {hwc} of {key} does not match its {n_in} inputs")
    return Rule(
        key, (n_out, n_in),
        to_flax=lambda a: a.reshape(n_out, c, h, w).transpose(2, 3, 1, 0).reshape(n_in, n_out),
        to_torch=lambda a: a.reshape(h, w, c, n_out).transpose(3, 2, 0, 1).reshape(n_out, n_in),
    )


def default_rule(spec: ModelSpec, collection: str, path: tuple[str, ...], leaf: str,
                 shape: tuple[int, ...]) -> Rule:
    """The generic Flax-leaf -> torch-tensor rule of the table in this module's docstring."""
    prefix = spec.torch_prefix(path)
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if collection == "batch_stats" and leaf in ("mean", "var"):
        return Rule(join(f"running_{leaf}"), shape, _same, _same)
    if collection == "params" and leaf == "kernel":
        key = join("weight")
        if len(shape) == 4:
            kh, kw, i, o = shape
            return Rule(key, (o, i, kh, kw), lambda a: a.transpose(2, 3, 1, 0),
                        lambda a: a.transpose(3, 2, 0, 1))
        if len(shape) == 3:
            k, i, o = shape
            return Rule(key, (o, i, k), lambda a: a.transpose(2, 1, 0),
                        lambda a: a.transpose(2, 1, 0))
        if len(shape) == 2:
            if prefix in spec.flatten:
                return _flatten_rule(key, shape, spec.flatten[prefix])
            return Rule(key, (shape[1], shape[0]), lambda a: a.T, lambda a: a.T)
    if collection == "params" and leaf == "scale":
        return Rule(join("weight"), shape, _same, _same)
    return Rule(join(leaf), shape, _same, _same)


def _init_shapes(spec: ModelSpec, module: nn.Module) -> Any:
    side = spec.init_size(module)
    x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)


def _rules(spec: ModelSpec, shapes: Any) -> dict[tuple[str, ...], Rule]:
    """One rule per Flax leaf, keyed by (collection, *module path, leaf)."""
    rules = {}
    for flat_key, leaf in traverse_util.flatten_dict(shapes).items():
        collection, *path, name = flat_key
        shape = tuple(leaf.shape)
        rule = spec.rules(collection, tuple(path), name, shape) if spec.rules else None
        rules[flat_key] = rule or default_rule(spec, collection, tuple(path), name, shape)
    return rules


def create(name: str, *, seed: int = 0, num_classes: int = 1000,
           **kw: Any) -> tuple[nn.Module, dict]:
    """A randomly initialised port of torchvision model ``name``.

    Args:
      name: a name from :func:`list_models` (torchvision's, e.g. ``"resnet18"``).
      seed: the PRNG seed of the initialisation (torchvision-like initialisers).
      num_classes: the classifier's width.
      **kw: module fields, e.g. ``activation=jax.nn.gelu`` (every Activation of the model).

    Returns:
      ``(module, variables)``: a ``flax.linen`` module taking float32 NHWC images and returning
      ``(N, num_classes)`` logits, in inference mode by default (``train=True`` for training
      mode), and its variables (``params`` and, for models with BatchNorm, ``batch_stats``).

    Raises:
      ValueError: an unknown name (the message lists the valid ones).
      TypeError: an unknown option in ``kw``.

    Example:
      >>> model, variables = create("resnet18", num_classes=10)
      >>> model.apply(variables, jnp.zeros((2, 64, 64, 3))).shape
      (2, 10)
    """
    spec = get_spec(name)
    module = build_module(spec, num_classes, kw)
    side = spec.init_size(module)
    x = jnp.zeros((1, side, side, 3), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(seed), x)
    return module, dict(variables)


def _mismatch_error(name: str, missing: list, unexpected: list, wrong: list, *,
                    what: str = "state dict") -> ValueError:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrongly shaped", wrong)):
        if items:
            more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    verb = "does" if what == "state dict" else "do"
    return ValueError(f"{what} {verb} not fit {name}: " + "; ".join(parts))


def from_torchvision(
    name: str, state_dict: Mapping[str, Any] | str | os.PathLike, *,
    num_classes: int | None = None, **kw: Any,
) -> tuple[nn.Module, dict]:
    """The port of torchvision model ``name`` with torchvision's weights.

    Args:
      name: a name from :func:`list_models`.
      state_dict: torchvision tensor names -> arrays (NumPy arrays or torch tensors), e.g.
        ``torchvision.models.resnet18().state_dict()``, or the path of a torch file
        (``.pth``, ``.pt``, ``.pth.tar``, ``.ckpt``, ``.bin``, any case; needs torch) or a
        ``.safetensors`` file (does not). A training checkpoint (``{"state_dict": ...,
        "epoch": ...}`` or ``"model"``), as a mapping or in a file, is unwrapped.
      num_classes: the classifier's width; read from the state dict's head when ``None``.
      **kw: module fields, as in :func:`create` (``activation=...``).

    Returns:
      ``(module, variables)`` as in :func:`create`, variables in float32, BatchNorm running
      statistics in ``batch_stats``.

    Raises:
      ValueError: unknown name, or a state dict that does not fit the model: the message names
        the model and the first missing, unexpected and wrongly shaped tensors; an unknown
        file suffix; a torch file holding a pickled module (``torch.save(model)``: save
        ``model.state_dict()`` instead).

    Example:
      >>> import torchvision                                       # doctest: +SKIP
      >>> sd = torchvision.models.resnet18(weights=None).state_dict()  # doctest: +SKIP
      >>> model, variables = from_torchvision("resnet18", sd)      # doctest: +SKIP
    """
    spec = get_spec(name)
    tensors = io.load_state_dict(state_dict)
    if num_classes is None:
        head = tensors.get(f"{spec.head}.weight")
        # a Linear (out, in) or a 1x1 Conv (out, in, 1, 1) head (SqueezeNet)
        num_classes = int(head.shape[0]) if head is not None and head.ndim in (2, 4) else 1000
    module = build_module(spec, num_classes, kw)
    shapes = _init_shapes(spec, module)
    rules = _rules(spec, shapes)
    leaves = traverse_util.flatten_dict(shapes)
    missing, wrong, used = [], [], set()
    flat = {}
    for flat_key, rule in rules.items():
        used.add(rule.torch_key)
        value = tensors.get(rule.torch_key)
        if value is None:
            missing.append(rule.torch_key)
            continue
        if tuple(value.shape) != rule.torch_shape:
            wrong.append(f"{rule.torch_key} {tuple(value.shape)} (expected {rule.torch_shape})")
            continue
        # A copy: on CPU jnp.asarray may share memory with the tensor, and then training
        # the torch model on (BatchNorm statistics updated in place) moved these variables.
        flat[flat_key] = jnp.array(
            rule.to_flax(np.asarray(value, np.float32)), dtype=leaves[flat_key].dtype, copy=True)
    unexpected = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                        and not (spec.ignored_prefixes and k.startswith(spec.ignored_prefixes)))
    if missing or unexpected or wrong:
        raise _mismatch_error(name, missing, unexpected, wrong)
    return module, dict(traverse_util.unflatten_dict(flat))


# State-dict metadata (``state_dict._metadata``: torch module name -> ``{"version": n}``) that
# a torchvision family's ``_load_from_state_dict`` needs. MNASNet's root module refuses a state
# dict without a version (``ValueError: version should be set to 1 or 2``) and rebuilds its
# stem for version 1; the ports are version 2. BatchNorm and other modules read no version
# (without one, BatchNorm fills in the absent ``num_batches_tracked``).
_TORCH_METADATA: dict[str, dict[str, dict[str, int]]] = {"mnasnet": {"": {"version": 2}}}


def _head_classes(spec: ModelSpec, rules: dict[tuple[str, ...], Rule],
                  flat: Mapping[tuple[str, ...], Any]) -> int | None:
    """The classifier width of ``variables``: the output axis of the head's kernel."""
    for key, rule in rules.items():
        if rule.torch_key == f"{spec.head}.weight" and key in flat:
            shape = np.shape(flat[key])
            # a Dense (in, out) or a 1x1 Conv (1, 1, in, out) head (SqueezeNet)
            return int(shape[-1]) if len(shape) in (2, 4) else None
    return None


def to_torchvision(name: str, variables: Mapping[str, Any], *,
                   num_classes: int | None = None, **kw: Any) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_torchvision`: torchvision's state dict of ``variables``.

    Args:
      name: a name from :func:`list_models`.
      variables: the port's variables (``params`` and, with BatchNorm, ``batch_stats``), as
        from :func:`create` or :func:`from_torchvision`. Other collections (``intermediates``)
        are ignored.
      num_classes: the classifier's width; read from the variables' head when ``None``.
      **kw: module fields that change parameter shapes (``image_size`` for ViT).

    Returns:
      A ``collections.OrderedDict`` of float32 NumPy arrays under torchvision's names
      (without ``num_batches_tracked``). ``torchvision.models.get_model(name)
      .load_state_dict(..., strict=False)`` accepts it after ``torch.from_numpy``, and
      ``from_torchvision(name, ...)`` gives ``variables`` back. Where torchvision's module
      needs it (MNASNet: ``{"": {"version": 2}}``), the dict carries torch's ``_metadata``
      attribute; keep it when converting the arrays to tensors
      (``tensors._metadata = sd._metadata``), since a new dict drops it.

    Raises:
      ValueError: unknown name, or variables that do not fit the model (another model's, or
        another ``num_classes``): the message names the first missing, unexpected and
        wrongly shaped leaves (``collection/module path/leaf``, shapes in Flax layout).

    Example:
      >>> _, variables = create("resnet18", num_classes=10)           # doctest: +SKIP
      >>> sd = to_torchvision("resnet18", variables)                  # doctest: +SKIP
      >>> sd["fc.weight"].shape                                       # doctest: +SKIP
      (10, 512)
    """
    spec = get_spec(name)
    flat = traverse_util.flatten_dict(dict(variables))
    classes = 1000 if num_classes is None else num_classes
    shapes = _init_shapes(spec, build_module(spec, classes, kw))
    rules = _rules(spec, shapes)
    if num_classes is None:
        found = _head_classes(spec, rules, flat)
        if found is not None and found != classes:
            classes = found
            shapes = _init_shapes(spec, build_module(spec, classes, kw))
            rules = _rules(spec, shapes)
    expected = traverse_util.flatten_dict(shapes)
    collections_ = {key[0] for key in expected} | {"params", "batch_stats"}
    order = sorted(expected, key=lambda k: (k[0] != "params", k))  # params first
    missing = ["/".join(k) for k in order if k not in flat]
    unexpected = ["/".join(k) for k in sorted(flat, key=lambda k: (k[0] != "params", k))
                  if k[0] in collections_ and k not in expected]
    wrong = [f"{'/'.join(k)} {tuple(np.shape(flat[k]))} (expected {tuple(expected[k].shape)})"
             for k in order if k in flat and tuple(np.shape(flat[k])) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise _mismatch_error(name, missing, unexpected, wrong, what="variables")
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict(
        (rule.torch_key, io.contiguous(rule.to_torch(np.asarray(flat[k], np.float32))))
        for k, rule in rules.items())
    metadata = _TORCH_METADATA.get(spec.family)
    if metadata is not None:
        out._metadata = {module: dict(m) for module, m in metadata.items()}  # type: ignore[attr-defined]
    return out


def eval_transform(name: str) -> EvalTransform:
    """The evaluation transform of the default torchvision weights of ``name``.

    Example:
      >>> t = eval_transform("resnet50")
      >>> (t.resize_size, t.crop_size, t.interpolation)
      (232, 224, 'bilinear')
    """
    return get_spec(name).transform
