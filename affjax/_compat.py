"""What differs between the supported releases of JAX and Flax, in one place.

The floors, and the releases below them that were tried: ``docs/compatibility.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
from flax import nnx

# The first Flax release with ``nnx.capture``, which NNX signatures are taken with.
NNX_CAPTURE_FLAX = "0.12.6"


def shard_map(fn: Callable, *, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
    """``fn`` mapped over the shards of ``mesh``, without the replication check.

    ``jax.shard_map(..., check_vma=False)`` from jax 0.6.1; before it,
    ``jax.experimental.shard_map.shard_map(..., check_rep=False)``, the same map.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(fn, mesh, in_specs, out_specs, check_rep=False)


def require_nnx_capture() -> None:
    """``ImportError`` naming the Flax release needed, where ``nnx.capture`` is missing."""
    if not hasattr(nnx, "capture"):
        raise ImportError(
            f"signatures of NNX modules need flax >= {NNX_CAPTURE_FLAX} (nnx.capture), and "
            f"this is flax {flax.__version__}: pip install 'affjax[nnx]' (that Flax needs "
            "jax >= 0.8.1). Signatures of linen modules work with this Flax."
        )
