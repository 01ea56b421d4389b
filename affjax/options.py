"""The options of the score, checked once where they enter and then passed as one value.

:class:`ScoreOptions` is frozen and hashable: it is a static argument of the jitted
score and of the batched layer scoring, and its fields are the keywords of
:func:`affjax.affinity_score`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from affjax import _checks
from affjax.covariance import COVARIANCES
from affjax.solvers import SOLVERS

PATHS: tuple[str, ...] = ("auto", "dense", "span")


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """How a score is computed; every field is checked when the object is made.

    Attributes:
      covariance: a name in :data:`affjax.covariance.COVARIANCES`.
      ridge: a finite real number ``>= 0``, stored as a Python float.
      solver: a name in :data:`affjax.solvers.SOLVERS` (resolved per layer shape by
        :func:`affjax.solvers.get_solver`).
      path: a name in :data:`PATHS`.
      sinkhorn_epsilon: a finite real number ``> 0`` (checked for every solver).

    Example:
      >>> ScoreOptions(solver="scipy").solver
      'scipy'
      >>> ScoreOptions(covariance="emprical")
      Traceback (most recent call last):
      ...
      ValueError: unknown covariance 'emprical'; expected one of ('empirical', 'ledoit_wolf')
    """

    covariance: str = "empirical"
    ridge: float = 1e-6
    solver: str = "auto"
    path: str = "auto"
    sinkhorn_epsilon: float = 1e-2

    def __post_init__(self) -> None:
        for name, value, allowed in (("covariance", self.covariance, COVARIANCES),
                                     ("solver", self.solver, SOLVERS),
                                     ("path", self.path, PATHS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if not _checks.is_real_number(self.ridge) or not 0 <= self.ridge < np.inf:
            raise ValueError(f"ridge must be a finite real number >= 0, got {self.ridge!r}")
        if (not _checks.is_real_number(self.sinkhorn_epsilon)
                or not 0 < self.sinkhorn_epsilon < np.inf):
            raise ValueError("sinkhorn_epsilon must be a finite real number > 0, got "
                             f"{self.sinkhorn_epsilon!r}")
        object.__setattr__(self, "ridge", float(self.ridge))
        object.__setattr__(self, "sinkhorn_epsilon", float(self.sinkhorn_epsilon))


def check_options(
    covariance: str, solver: str, path: str = "auto", ridge: float = 0.0,
    sinkhorn_epsilon: float = 1e-2,
) -> None:
    """Raise ``ValueError`` naming an unknown option, a negative ridge or a bad epsilon.

    The checks of :class:`ScoreOptions`, for callers that keep the options apart.

    Example:
      >>> check_options("empirical", "auto", ridge=1e-6)
      >>> check_options("empirical", "sinkhorn", sinkhorn_epsilon=0.0)
      Traceback (most recent call last):
      ...
      ValueError: sinkhorn_epsilon must be a finite real number > 0, got 0.0
    """
    ScoreOptions(covariance=covariance, ridge=ridge, solver=solver, path=path,
                 sinkhorn_epsilon=sinkhorn_epsilon)
