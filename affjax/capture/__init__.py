"""Capture of pre/post-activation tensors in Flax models.

Two sources are captured, in the order the forward pass calls them:

* :class:`Activation` (linen) and :class:`NnxActivation` (NNX) modules. They
  ``sow`` the reduced input and output into the ``"intermediates"`` collection
  (linen) or as ``nnx.Intermediate`` (NNX), one entry per call.
* Activation *functions* called by attribute at run time: ``nn.relu(x)``,
  ``jax.nn.gelu(x)``, ``nnx.silu(x)``, ... (the names in
  :data:`CAPTURED_FUNCTIONS`, on ``jax.nn``, ``flax.linen`` and ``flax.nnx``).
  While a capture runs these attributes are swapped for recording wrappers.
  Inside a linen module the wrapper sows into that module like
  :class:`Activation` does. Not captured: functions bound before the capture
  (``from jax.nn import relu`` at import time, ``act = nn.relu`` stored as a
  dataclass field and called later is fine only through :class:`Activation`),
  ``jnp.tanh``/``jnp.maximum`` and other non-activation primitives, and
  ``softmax`` (attention internals, skipped as the published pipeline did).

Transforms inside the model: calls under Flax's ``nn.jit``/``nn.remat`` and
``nnx.jit``/``nnx.remat`` are captured. Calls inside ``nn.scan``/``nn.vmap``
(one traced body stands for many calls) or inside a raw ``jax.jit``/``lax``
loop (values cannot leave it) are recorded as such, and the signature raises an
error naming them instead of returning wrong or missing scores.

A global call counter gives the forward order across modules, so interleaved
calls (``a(b(a(x)))``) come out as a, b, a.

Reduction to a (samples, features) matrix happens at capture time, inside the
traced function, so full activation maps are never stored:
rank 4 (NHWC) -> mean over H, W; rank 3 (N, T, D) -> mean over D by default
(the published pipeline's choice: tokens act as features) or over T
(``tokens="mean_tokens"``); rank 2 as is; any other rank is an error naming the
layer.

The package: :func:`capture_layers` runs a model once and returns its calls as
:class:`Layer` objects; :class:`LayerSelection` picks the layers a signature scores.
"""

from affjax.capture._activations import CAPTURED_FUNCTIONS
from affjax.capture._activations import COLLECTION
from affjax.capture._activations import SOW_NAME
from affjax.capture._activations import TOKEN_MODES
from affjax.capture._activations import Activation
from affjax.capture._activations import Call
from affjax.capture._activations import CaptureContext
from affjax.capture._activations import NnxActivation
from affjax.capture._activations import activation_kind
from affjax.capture._activations import capturing
from affjax.capture._activations import fresh_capture_ids
from affjax.capture._activations import reduce_activation
from affjax.capture._activations import renew_capture_stamp
from affjax.capture._layers import Layer
from affjax.capture._layers import capture_layers
from affjax.capture._selection import LayerSelection

__all__ = [
    "Activation",
    "CAPTURED_FUNCTIONS",
    "COLLECTION",
    "Call",
    "CaptureContext",
    "Layer",
    "LayerSelection",
    "NnxActivation",
    "SOW_NAME",
    "TOKEN_MODES",
    "activation_kind",
    "capture_layers",
    "capturing",
    "fresh_capture_ids",
    "reduce_activation",
    "renew_capture_stamp",
]
