"""affjax: the affinity score and non-linearity signatures of deep networks, in JAX.

Implements Bouniot et al., "From Alexnet to Transformers: Measuring the
Non-linearity of Deep Neural Networks with Affine Optimal Transport", CVPR 2025.
"""

from importlib import metadata as _metadata

from affjax import regularizers  # a module: affjax.regularizers.target_penalty(...)
from affjax.assignment import AssignmentResult
from affjax.assignment import linear_assignment
from affjax.capture import Activation
from affjax.capture import LayerSelection
from affjax.capture import NnxActivation
from affjax.covariance import empirical_covariance
from affjax.covariance import ledoit_wolf_covariance
from affjax.covariance import ledoit_wolf_shrinkage
from affjax.data import load_dataset
from affjax.linalg import psd_inv_sqrt
from affjax.linalg import psd_sqrt
from affjax.metrics import difference_norm
from affjax.metrics import dtw_distance
from affjax.metrics import histogram_entropy
from affjax.metrics import linear_cka
from affjax.metrics import linear_fit_r2
from affjax.metrics import sparsity
from affjax.options import ScoreOptions
from affjax.runner import run_signature
from affjax.score import AffinityResult
from affjax.score import affinity
from affjax.score import affinity_score
from affjax.signature import Signature
from affjax.signature import signature
from affjax.signature import signature_over_batches
from affjax.signature import signature_scores
from affjax.transport import bures_map
from affjax.transport import bures_w2
from affjax.transport import exact_w2
from affjax.transport import optimal_assignment
from affjax.transport import optimal_permutation
from affjax.transport import sinkhorn_w2_squared
from affjax.transport import w2_squared

try:
    __version__ = _metadata.version("affjax")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "Activation",
    "AffinityResult",
    "AssignmentResult",
    "LayerSelection",
    "NnxActivation",
    "ScoreOptions",
    "Signature",
    "affinity",
    "affinity_score",
    "bures_map",
    "bures_w2",
    "difference_norm",
    "dtw_distance",
    "empirical_covariance",
    "exact_w2",
    "histogram_entropy",
    "ledoit_wolf_covariance",
    "ledoit_wolf_shrinkage",
    "linear_cka",
    "linear_assignment",
    "linear_fit_r2",
    "load_dataset",
    "optimal_assignment",
    "optimal_permutation",
    "psd_inv_sqrt",
    "psd_sqrt",
    "regularizers",
    "run_signature",
    "signature",
    "signature_over_batches",
    "signature_scores",
    "sinkhorn_w2_squared",
    "sparsity",
    "w2_squared",
]
