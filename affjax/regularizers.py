"""The affinity score as a differentiable training regularizer.

Loss terms built from :func:`affjax.signature_scores`, computed inside the
training step and differentiated with the task loss::

    import optax
    from affjax import regularizers

    def loss_fn(params, x, labels):
        # One forward pass gives the logits and the selected layers' scores.
        logits, scores = regularizers.output_and_scores(model, {"params": params}, x)
        task = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return task + regularizers.target_penalty_from_scores(scores, target=0.6, weight=1.0)

    @jax.jit
    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

Terms:

* :func:`target_penalty`: ``weight * mean_l (score_l - target_l)^2`` over the
  selected layers; ``target`` a scalar or one value per selected layer.
* :func:`mean_nonlinearity`: ``weight * mean_l (1 - score_l)``. A positive
  weight penalises non-linearity (pushes the layers towards affine), a negative
  weight rewards it.

Each has a ``*_from_scores`` form that takes the ``(L,)`` scores, for use with
:func:`output_and_scores`, which returns the model output (what ``model.apply``
returns) together with the scores from the same forward pass. Calling
``model.apply`` and :func:`target_penalty` separately runs the forward pass
twice and, worse, backpropagates through it twice.

Gradients: exact solvers (``"auction"`` and ``"hungarian"`` on the device, ``"scipy"``
on the host through a callback, ``"identity_or_scipy"`` between them, ``"sort"`` for
1-D layers) hold
the optimal matching fixed and differentiate the matched cost; this is the gradient
of the exact score wherever the optimal matching is unique (almost everywhere).
``"sinkhorn"`` (OTT-JAX, on device, smooth) differentiates the entropic plan's
cost by unrolling; it is biased low and costs more (``docs/regularizers.md``).
With ``"auto"`` on an accelerator (the certified auction) the whole training step
runs on the device, every layer's assignment in one batched call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from affjax.capture import LayerSelection
from affjax.signature import signature_scores

__all__ = [
    "mean_nonlinearity",
    "mean_nonlinearity_from_scores",
    "output_and_scores",
    "target_penalty",
    "target_penalty_from_scores",
]


def _no_return_output(what: str, apply_kwargs: dict) -> None:
    # signature_scores' return_output would turn the scores into (output, scores) here.
    if "return_output" in apply_kwargs:
        raise TypeError(f"{what} takes no return_output: for the model output and the scores "
                        "of one forward pass, use output_and_scores and "
                        f"{what}_from_scores")


def _check_model(model: Any, variables: Any) -> None:
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("an nnx.Module carries its own state: pass variables=None")
        return
    if not hasattr(model, "apply"):
        raise TypeError(
            f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
        )
    if not hasattr(variables, "items"):
        raise TypeError(
            f"a linen model needs its variables (a dict such as {{'params': ...}}), got "
            f"{type(variables).__name__}"
        )


def output_and_scores(
    model: Any,
    variables: Any,
    x: Any,
    *,
    solver: str = "auto",
    covariance: str = "empirical",
    ridge: float = 1e-6,
    sinkhorn_epsilon: float = 1e-2,
    select: LayerSelection | None = None,
    tokens: str = "mean_features",
    functions: bool = True,
    **apply_kwargs: Any,
) -> tuple[Any, jax.Array]:
    """The model output and the affinity scores of its selected layers, from one forward pass.

    Args:
      model: a ``flax.linen.Module``, or an ``nnx.Module`` with ``variables=None``.
      variables: linen variables (``{"params": ..., "batch_stats": ...}``).
      x: input batch, batch axis first, at least 2 samples.
      solver: ``"auto"``, ``"auction"``, ``"identity_or_scipy"``, ``"scipy"``,
        ``"hungarian"``, ``"sinkhorn"`` (see the module docstring).
      covariance, ridge, sinkhorn_epsilon: as in :func:`affjax.affinity_score`.
      select, tokens, functions: layer selection (or its keywords ``include``,
        ``exclude``, ``kinds``, ``exclude_kinds``) and capture options of
        :func:`affjax.signature_scores`.
      **apply_kwargs: passed to ``model.apply``; with ``mutable=[...]`` (e.g.
        ``"batch_stats"`` in training mode) the output is ``(y, updated)``,
        exactly as ``model.apply`` returns it.

    Returns:
      ``(output, scores)``: what ``model.apply(variables, x, **apply_kwargs)``
      returns, and the ``(L,)`` scores of the selected layers in forward order
      (float32 for float32 models, float64 under ``jax_enable_x64`` with
      float64 inputs).

    Example:
      >>> logits, scores = output_and_scores(model, variables, x)   # doctest: +SKIP
      >>> term = target_penalty_from_scores(scores, target=0.5)       # doctest: +SKIP
    """
    _check_model(model, variables)
    if "return_output" in apply_kwargs:
        raise TypeError("output_and_scores always returns (output, scores); it takes no "
                        "return_output (for the scores alone use affjax.signature_scores)")
    return signature_scores(
        model, variables, x, solver=solver, covariance=covariance, ridge=ridge,
        sinkhorn_epsilon=sinkhorn_epsilon,
        select=LayerSelection.pop_from(select, apply_kwargs), tokens=tokens,
        functions=functions, return_output=True, **apply_kwargs,
    )


def _concrete(v: ArrayLike) -> np.ndarray | None:
    try:
        return np.asarray(v)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _as_float(name: str, v: ArrayLike, dtype: Any) -> jax.Array:
    dtype_in = v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype
    if not (jnp.issubdtype(dtype_in, jnp.floating) or jnp.issubdtype(dtype_in, jnp.integer)):
        raise TypeError(f"{name} must be a real number or array, got {v!r} of dtype {dtype_in}")
    concrete = _concrete(v)
    if concrete is not None:  # traced values (a schedule under jit) are not checked
        if not np.all(np.isfinite(concrete)):
            raise ValueError(f"{name} must be finite, got {concrete}")
        with np.errstate(over="ignore"):
            cast = np.asarray(concrete).astype(dtype)
        if not np.all(np.isfinite(cast)):
            raise ValueError(f"{name} = {concrete} overflows the scores' dtype {np.dtype(dtype)}")
    return jnp.asarray(v).astype(dtype)


def _scores_vector(scores: ArrayLike) -> jax.Array:
    s = jnp.asarray(scores)
    if s.ndim != 1 or s.shape[0] == 0:
        raise ValueError(f"scores must have shape (L,) with L >= 1 layers, got shape {s.shape}")
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise TypeError(f"scores must be floating point, got dtype {s.dtype}")
    return s


def target_penalty_from_scores(
    scores: ArrayLike, *, target: ArrayLike, weight: ArrayLike = 1.0
) -> jax.Array:
    """``weight * mean_l (scores_l - target_l)^2``.

    Args:
      scores: ``(L,)`` affinity scores (from :func:`output_and_scores` or
        :func:`affjax.signature_scores`).
      target: scalar, or ``(L,)`` one target per layer; scores lie in
        ``[0, 1]``, so must the targets (a ``ValueError``; a traced target
        outside gives a NaN penalty).
      weight: scalar multiplier (may be traced, e.g. a schedule).

    Returns:
      A scalar in the scores' dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(target_penalty_from_scores(jnp.array([0.5, 0.9]), target=0.7,
      ...                                            weight=2.0)), 6)
      0.08
    """
    s = _scores_vector(scores)
    t = _as_float("target", target, s.dtype)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != s.shape[0]):
        raise ValueError(
            f"target must be a scalar or have shape ({s.shape[0]},), one value per selected "
            f"layer, got shape {t.shape}; list the selected layers with "
            "affjax.signature(model, variables, x, include=...)"
        )
    concrete = _concrete(target)
    if concrete is not None and (np.any(concrete < 0) or np.any(concrete > 1)):
        raise ValueError(f"target must lie in [0, 1] (affinity scores do), got {concrete}")
    w = _as_float("weight", weight, s.dtype)
    if w.ndim:
        raise ValueError(f"weight must be a scalar, got shape {w.shape}")
    penalty = w * jnp.mean((s - t) ** 2)
    if concrete is None:  # traced (a jit argument): cannot raise, so NaN, not a number
        penalty = jnp.where(jnp.all((t >= 0) & (t <= 1)), penalty, jnp.nan)
    return penalty


def mean_nonlinearity_from_scores(scores: ArrayLike, *, weight: ArrayLike = 1.0) -> jax.Array:
    """``weight * mean_l (1 - scores_l)``: positive weight penalises non-linearity.

    Args:
      scores: ``(L,)`` affinity scores.
      weight: scalar; ``> 0`` pushes the selected layers towards affine,
        ``< 0`` rewards non-linearity.

    Returns:
      A scalar in the scores' dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(mean_nonlinearity_from_scores(jnp.array([0.5, 0.9]), weight=-1.0)), 6)
      -0.3
    """
    s = _scores_vector(scores)
    w = _as_float("weight", weight, s.dtype)
    if w.ndim:
        raise ValueError(f"weight must be a scalar, got shape {w.shape}")
    return w * jnp.mean(1.0 - s)


def target_penalty(
    model: Any,
    variables: Any,
    x: Any,
    *,
    target: ArrayLike,
    weight: ArrayLike = 1.0,
    solver: str = "auto",
    covariance: str = "empirical",
    ridge: float = 1e-6,
    sinkhorn_epsilon: float = 1e-2,
    select: LayerSelection | None = None,
    tokens: str = "mean_features",
    functions: bool = True,
    **apply_kwargs: Any,
) -> jax.Array:
    """Penalty on the distance of each selected layer's score to a target.

    ``weight * mean_l (score_l - target_l)^2`` with the scores of
    :func:`affjax.signature_scores` on the batch ``x``. Pure, jittable and
    differentiable with respect to ``variables``. When the task loss needs the
    model output too, use :func:`output_and_scores` and
    :func:`target_penalty_from_scores` instead (one forward pass).

    Args:
      model, variables, x: as in :func:`affjax.signature_scores`.
      target: scalar or ``(L,)`` per selected layer, in ``[0, 1]``.
      weight: scalar multiplier.
      solver, covariance, ridge, sinkhorn_epsilon, select, tokens, functions,
        **apply_kwargs: see :func:`output_and_scores`.

    Returns:
      A scalar in the scores' dtype.

    Numerical caveats: the score of a batch of n samples is biased low when
    the layer width approaches n (see ``docs/numerics.md``), so a target is
    met for a given batch size; at a score of exactly 1 (an affine layer) the
    gradient is 0 (the square root's derivative is infinite there and set to 0).

    Example:
      >>> term = target_penalty(model, variables, x, target=0.5, weight=0.1)  # doctest: +SKIP
    """
    _check_model(model, variables)
    _no_return_output("target_penalty", apply_kwargs)
    scores = signature_scores(
        model, variables, x, solver=solver, covariance=covariance, ridge=ridge,
        sinkhorn_epsilon=sinkhorn_epsilon,
        select=LayerSelection.pop_from(select, apply_kwargs), tokens=tokens,
        functions=functions, **apply_kwargs)
    return target_penalty_from_scores(scores, target=target, weight=weight)


def mean_nonlinearity(
    model: Any,
    variables: Any,
    x: Any,
    *,
    weight: ArrayLike = 1.0,
    solver: str = "auto",
    covariance: str = "empirical",
    ridge: float = 1e-6,
    sinkhorn_epsilon: float = 1e-2,
    select: LayerSelection | None = None,
    tokens: str = "mean_features",
    functions: bool = True,
    **apply_kwargs: Any,
) -> jax.Array:
    """Penalty (``weight > 0``) or reward (``weight < 0``) on the mean non-linearity.

    ``weight * mean_l (1 - score_l)`` over the selected layers. Pure, jittable
    and differentiable with respect to ``variables``; see
    :func:`target_penalty` for the options and caveats.

    Returns:
      A scalar in the scores' dtype.

    Example:
      >>> term = mean_nonlinearity(model, variables, x, weight=-0.1)  # doctest: +SKIP
    """
    _check_model(model, variables)
    _no_return_output("mean_nonlinearity", apply_kwargs)
    scores = signature_scores(
        model, variables, x, solver=solver, covariance=covariance, ridge=ridge,
        sinkhorn_epsilon=sinkhorn_epsilon,
        select=LayerSelection.pop_from(select, apply_kwargs), tokens=tokens,
        functions=functions, **apply_kwargs)
    return mean_nonlinearity_from_scores(scores, weight=weight)
