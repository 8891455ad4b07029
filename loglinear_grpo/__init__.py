"""loglinear_grpo — theory-faithful Group Robust Preference Optimization for log-linear policies.

Ramesh et al. (2024), "Group Robust Preference Optimization in Reward-free RLHF",
arXiv:2405.20304. The toolkit solves

    min_{θ∈Θ} max_{α∈Δ_K} Σ_g α_g L_g(θ),   L_g(θ) = mean_{i∈D_g} ℓ(s_iᵀθ − r_i)

for the DPO, IPO and hinge losses, and certifies the answer (exact optimum, duality gap).
"""
from .certificate import CertificateWarning
from .constraints import Box, ConvexSet, L2Ball, ThetaSet, Unconstrained
from .data import PreferenceData
from .groups import Membership, intersect_groupings
from .closed_form import weighted_least_squares
from .duality import best_response, duality_gap
from .exact import ExactResult, solve_exact
from .losses import pair_loss, pair_loss_derivative
from .objective import group_losses, group_metrics, margins, weighted_gradient, worst_group_loss
from .operators import PairOperator
from .settings import Settings
from .algorithm1 import SolverState, averaged_alpha, averaged_theta, init, sample_batch, update
from .schedules import StepSize, theory_constants, theory_step_sizes
from .solver import ConvergenceWarning, SolveResult, SolverConfig, make_config, solve
from .path import PathResult, ReferencePoint, solve_path
from .objective import group_adjustment
from . import inference

__version__ = "0.1.0"

__all__ = [
    "CertificateWarning", "ConvergenceWarning", "Membership", "intersect_groupings", "PathResult", "ReferencePoint", "group_adjustment", "inference",
    "solve_path", "Box", "ConvexSet", "ExactResult", "L2Ball", "PairOperator", "PreferenceData", "Settings", "SolveResult", "SolverConfig",
    "SolverState", "StepSize", "ThetaSet", "Unconstrained", "averaged_alpha", "averaged_theta", "best_response",
    "duality_gap", "group_losses", "group_metrics", "init", "make_config", "margins", "pair_loss",
    "pair_loss_derivative", "sample_batch", "solve", "solve_exact", "theory_constants",
    "theory_step_sizes", "update", "weighted_gradient", "weighted_least_squares",
    "worst_group_loss",
]
