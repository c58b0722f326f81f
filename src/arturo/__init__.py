"""arTuRO: information-theoretic trust regions for stochastic gradient-based optimization.

Dahlinger, Becker, Hüttenrauch, Neumann (OPT@NeurIPS 2023, arXiv:2310.20574).
"""

from .optimizer import Arturo, NonFiniteGradientError, SparseGradientError
from .posterior import fit_sampling_temperature, predict, predict_regression

__all__ = [
    "Arturo",
    "NonFiniteGradientError",
    "SparseGradientError",
    "__version__",
    "fit_sampling_temperature",
    "predict",
    "predict_regression",
]
__version__ = "0.1.0"
