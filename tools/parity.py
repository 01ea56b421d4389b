"""Parity of the ports with torchvision: logits and signatures on the same random input.

For each model: build torchvision's model with random weights (``weights=None``, nothing
downloads) and random BatchNorm statistics and affine parameters, convert it with
:func:`affjax.models.from_torchvision`, run both on the same standard-normal batch, and
compare

* the logits: ``max |flax - torch| / max |torch|`` (float32 on both sides);
* the signature: affjax's (``affjax.signature`` on the Flax model) against one computed from
  torch forward hooks on every activation module (one entry per call, in call order, the
  input captured by a pre-hook because torchvision's ReLUs are in-place) and on the
  ``torch.nn.functional`` activations called outside activation modules (``TORCH_FUNCTIONS``:
  DenseNet's last ReLU, GoogLeNet's and Inception's ``BasicConv2d``), reduced as the
  published pipeline does ((N, C, H, W) -> mean over H, W; (N, T, D) -> mean over D) and
  scored with :func:`affjax.affinity_score` in float64. One exception: a 4-D activation input
  produced by an ``nn.Linear`` is channels-last (N, H, W, C) (ConvNeXt and Swin MLPs) and is
  averaged over H, W keeping C, as the port's NHWC reduction does (the published hooks
  treated every 4-D tensor as NCHW; docs/models.md);
* the names: the Flax signature names, ``/`` -> ``.`` and the call index dropped, must equal
  the torch module names in call order.

Command line, from the repository root (needs torch and torchvision)::

    python tools/parity.py --all --batch 8 --markdown table.md
    python tools/parity.py resnet18 alexnet --size 96

A repository tool, not part of the installed package: run as a script it imports this
checkout's ``affjax``; ``tests/test_models_parity.py`` imports it from ``tools/``. Importing
this module does not import torch; the functions do.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

# torch activation module class names captured by the hooks (the published pipeline's list).
TORCH_ACTIVATIONS = ("ReLU", "ReLU6", "GELU", "SiLU", "Sigmoid", "Hardswish", "Hardsigmoid",
                     "Tanh", "ELU", "LeakyReLU", "Mish", "Softplus")
# torch.nn.functional activations also recorded when a model calls them outside an activation
# module (DenseNet's final ``F.relu``, GoogLeNet/Inception's ``BasicConv2d``), which the
# published module hooks missed. Such a call is named ``<calling module>.<function>``
# (``relu`` for a call in the top-level forward); the port scores it with an ``Activation``
# of that name. Calls made by an activation module's own forward are not counted twice.
TORCH_FUNCTIONS = ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "elu",
                   "leaky_relu", "mish", "softplus")

# torch submodules whose activations are not signature layers: Swin V2's continuous position
# bias MLP maps a fixed coordinate table (batch axis 1), independent of the input
# (docs/models.md); the ports compute it without an Activation.
SKIPPED_MODULES = ("cpb_mlp",)


@dataclasses.dataclass
class ParityResult:
    """One model's comparison (see the module docstring)."""

    name: str
    size: int
    parameters: int
    logit_error: float
    signature_error: float
    calls: int
    names_match: bool
    torch_scores: np.ndarray
    flax_scores: np.ndarray
    seconds: float


# Models whose torchvision initialisation (normal, std 0.01 or 0.1) shrinks the signal so much
# that, with random BatchNorm statistics, the logits no longer depend on the input (GoogLeNet:
# spread over the batch 6e-9 of the logit scale): the comparison then re-initialises every
# Conv2d/Linear weight He-normal (fan in), so the logits test the whole convolution path.
HE_INIT_MODELS = frozenset({"googlenet", "inception_v3"})


def torchvision_model(name: str, *, seed: int = 0, **kwargs: Any) -> Any:
    """torchvision's ``name`` in eval mode with random weights and random BatchNorm state.

    ``kwargs`` go to torchvision's constructor (``image_size=64`` for ViT), after the options
    of the default weights (``ModelSpec.torchvision_kwargs``: GoogLeNet/Inception's
    ``transform_input``). Running means ~ U(-0.5, 0.5), running variances ~ U(0.5, 2),
    BatchNorm weights ~ U(0.5, 1.5) and biases ~ U(-0.5, 0.5), so the import of every
    BatchNorm tensor matters. Any other parameter torchvision initialises to a constant (zero
    biases, LayerNorm weights, ViT's zero head and class token, ConvNeXt's layer scale 1e-6)
    gets U(-0.5, 0.5) added, so that its import matters too (a zero head would make every
    logit 0). He-normal weights for the models in ``HE_INIT_MODELS``.
    """
    import torch
    import torchvision

    from affjax import models

    torch.manual_seed(seed)
    kwargs = {**models.get_spec(name).torchvision_kwargs, **kwargs}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if name in HE_INIT_MODELS and isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        batch_norm_params = {id(p) for m in model.modules()
                             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                             for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in batch_norm_params and p.numel() > 1 and bool(p.min() == p.max()):
                p.add_(torch.empty_like(p).uniform_(-0.5, 0.5))
    return model.eval()


def _reduce(t: Any, *, channels_last: bool = False) -> np.ndarray:
    a = t.detach().double().numpy()
    if a.ndim == 4:  # (N, C, H, W), or (N, H, W, C) when channels_last
        return a.mean(axis=(1, 2) if channels_last else (2, 3))
    if a.ndim == 3:  # (N, T, D): tokens act as features
        return a.mean(axis=2)
    return a.reshape(a.shape[0], -1)


def torch_activation_calls(model: Any, x: Any) -> tuple[list[str], list[tuple[np.ndarray,
                                                                               np.ndarray]], Any]:
    """Run ``model(x)`` with hooks on every activation module (and ``TORCH_FUNCTIONS``).

    A 4-D input that is the output of an ``nn.Linear`` (channels-last MLPs of ConvNeXt and
    Swin) is reduced over axes 1, 2 (keeping channels), any other 4-D tensor over 2, 3 (NCHW).

    Returns:
      ``(names, pairs, logits)``: the module name of each call in call order, the reduced
      float64 ``(input, output)`` of each call, and the model output.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    names: list[str] = []
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[tuple[Any, bool]] = []
    linear_outputs: dict[int, Any] = {}  # id -> tensor (kept alive so ids are not reused)
    handles = []
    stack: list[str] = []  # names of the modules whose forward is running
    inside = [0]  # > 0 while an activation module's forward runs

    def linear_hook(module, args, output):
        if output.ndim == 4:
            linear_outputs[id(output)] = output

    def pre_hook(module_name):
        def hook(module, args):
            x = args[0]
            channels_last = linear_outputs.get(id(x)) is x
            pending.append((x.detach().clone(), channels_last))  # before an in-place ReLU
            inside[0] += 1
        return hook

    def post_hook(module_name):
        def hook(module, args, output):
            inside[0] -= 1
            x, channels_last = pending.pop()
            names.append(module_name)
            pairs.append((_reduce(x, channels_last=channels_last),
                          _reduce(output, channels_last=channels_last)))
        return hook

    def enter(module_name):
        def hook(module, args):
            stack.append(module_name)
        return hook

    def leave(module, args, output):
        stack.pop()

    def mute(module, args):
        inside[0] += 1

    def unmute(module, args, output):
        inside[0] -= 1

    def functional(function_name, original):
        def wrapper(x, *args, **kwargs):
            if inside[0] or not isinstance(x, torch.Tensor):
                return original(x, *args, **kwargs)
            before = _reduce(x)  # before an in-place call overwrites it
            out = original(x, *args, **kwargs)
            caller = stack[-1] if stack else ""
            names.append(f"{caller}.{function_name}" if caller else function_name)
            pairs.append((before, _reduce(out)))
            return out
        return wrapper

    for module_name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(module_name)))
        handles.append(module.register_forward_hook(leave))
        if module_name.split(".")[-1] in SKIPPED_MODULES:
            # Not layers (docs/models.md); mute functional activations inside them too.
            handles.append(module.register_forward_pre_hook(mute))
            handles.append(module.register_forward_hook(unmute))
        if any(part in SKIPPED_MODULES for part in module_name.split(".")):
            continue
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        if type(module).__name__ in TORCH_ACTIVATIONS:
            handles.append(module.register_forward_pre_hook(pre_hook(module_name)))
            handles.append(module.register_forward_hook(post_hook(module_name)))
    originals = {f: getattr(F, f) for f in TORCH_FUNCTIONS}
    try:
        for f, original in originals.items():
            setattr(F, f, functional(f, original))
        with torch.no_grad():
            logits = model(x)
    finally:
        for f, original in originals.items():
            setattr(F, f, original)
        for h in handles:
            h.remove()
    return names, pairs, logits


def flax_to_torch_name(signature_name: str) -> str:
    """``layer1.0/relu:1`` -> ``layer1.0.relu`` (the torch module of that call)."""
    return signature_name.rsplit(":", 1)[0].replace("/", ".")


def compare(name: str, *, size: int | None = None, batch: int = 8, seed: int = 0) -> ParityResult:
    """Compare the port of ``name`` with torchvision (needs torch, torchvision, jax x64).

    ``size`` defaults to the model's ``ModelSpec.parity_size``.
    """
    import torch

    import affjax
    from affjax import models

    size = size or models.get_spec(name).parity_size

    if not jax.config.jax_enable_x64:
        raise RuntimeError("parity.compare scores the torch reference in float64: enable "
                           "jax_enable_x64 first")
    start = time.perf_counter()
    spec = models.get_spec(name)
    size_kw = {spec.size_argument: size} if spec.size_argument else {}
    tmodel = torchvision_model(name, seed=seed, **size_kw)
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    torch_names, pairs, logits = torch_activation_calls(tmodel, torch.from_numpy(x))
    ref = logits.numpy()
    module, variables = models.from_torchvision(name, tmodel.state_dict(), **size_kw)
    parameters = sum(p.numel() for p in tmodel.parameters())
    del tmodel
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    out = np.asarray(jax.jit(module.apply)(variables, x_nhwc))
    logit_error = float(np.abs(out - ref).max() / np.abs(ref).max())
    sig = affjax.signature(module, variables, x_nhwc)
    torch_scores = np.array([float(affjax.affinity_score(a, b)) for a, b in pairs])
    names_match = [flax_to_torch_name(n) for n in sig.names] == torch_names
    if len(sig.scores) == len(torch_scores):
        signature_error = float(np.abs(sig.scores - torch_scores).max())
    else:
        signature_error = float("inf")
    return ParityResult(name, size, int(parameters), logit_error, signature_error, len(torch_names),
                        names_match, torch_scores, np.asarray(sig.scores),
                        time.perf_counter() - start)


def markdown_table(results: Sequence[ParityResult], *, batch: int) -> str:
    lines = [f"Input {batch} x 3 x S x S, standard normal; random weights and BatchNorm "
             "statistics.", "",
             "| model | S | parameters | max logit error | max signature error | activation "
             "calls | names match | seconds |",
             "|---|---:|---:|---:|---:|---:|:---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.size} | {r.parameters:,} | {r.logit_error:.1e} | "
                     f"{r.signature_error:.1e} | {r.calls} | {'yes' if r.names_match else 'NO'} "
                     f"| {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/parity.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="model names (default: --all)")
    parser.add_argument("--all", action="store_true", help="every ported model")
    parser.add_argument("--size", type=int, default=None,
                        help="input side (default: each model's ModelSpec.parity_size, 64 for "
                        "most, 128 for AlexNet); raised to the model's min_size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="also write the result table to this file")
    parser.add_argument("--logit-tol", type=float, default=1e-4)
    parser.add_argument("--signature-tol", type=float, default=2e-3)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    from affjax import models

    names = models.list_models() if args.all or not args.names else args.names
    results = []
    for name in names:
        spec = models.get_spec(name)
        size = args.size or spec.parity_size
        if not spec.size_argument:  # otherwise the model is built for this size
            size = max(size, spec.min_size)
        r = compare(name, size=size, batch=args.batch, seed=args.seed)
        results.append(r)
        print(f"{r.name:<20} params {r.parameters:>12,}  logit err {r.logit_error:.1e}  "
              f"signature err {r.signature_error:.1e}  calls {r.calls:>3}  names "
              f"{'ok' if r.names_match else 'DIFFER'}  {r.seconds:.0f} s", flush=True)
    table = markdown_table(results, batch=args.batch)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    failed = [r.name for r in results if not (r.names_match and r.logit_error <= args.logit_tol
                                              and r.signature_error <= args.signature_tol)]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # This checkout's affjax, ahead of any installed copy.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
