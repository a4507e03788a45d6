"""altgrad.es_layers: batched perturbed layers for evolution strategies.

A whole population of perturbed networks is evaluated in one batched forward: each population member
("direction") ``k`` sees the weights ``W + E_k``; the update ``Σ_k w_k E_k`` is written into ``param.grad`` so that
any ``torch.optim`` optimizer can take the step.
"""

from . import distributed, functional, noise, shaping
from ._version import __version__
from .affine import PerturbedAffine
from .attention import PerturbedMultiheadAttention
from .base import Perturbed
from .conv import FlipoutConv2d, LowRankConv2d, PermutedConv2d, PerturbedConv2d, SyntheticConv2d
from .convert import MODES, perturb
from .distributed import RankMismatchError, all_gather_fitness, broadcast_seed, shard, shard_members
from .explicit import deltas_from_vectors, perturbed_parameters, population
from .hosts import PerturbedConv1d, PerturbedEmbedding, PerturbedLayerNorm
from .linear import (
    FlipoutLinear,
    LowRankLinear,
    PermutedLinear,
    PerturbedLinear,
    SparsePerturbedLinear,
    SyntheticLinear,
)
from .model import PerturbedModel
from .noise import sample_normal, sample_rademacher, sample_uniform
from .plan import Plan, PlanEntry
from .recurrent import PerturbedGRU, PerturbedLSTM
from .shaping import antithetic_difference, centered_ranks, z_score

__all__ = [
    "MODES",
    "FlipoutConv2d",
    "FlipoutLinear",
    "LowRankConv2d",
    "LowRankLinear",
    "PermutedConv2d",
    "PermutedLinear",
    "Perturbed",
    "PerturbedAffine",
    "PerturbedConv1d",
    "PerturbedConv2d",
    "PerturbedEmbedding",
    "PerturbedGRU",
    "PerturbedLSTM",
    "PerturbedLayerNorm",
    "PerturbedLinear",
    "PerturbedModel",
    "PerturbedMultiheadAttention",
    "Plan",
    "PlanEntry",
    "RankMismatchError",
    "SparsePerturbedLinear",
    "SyntheticConv2d",
    "SyntheticLinear",
    "__version__",
    "all_gather_fitness",
    "antithetic_difference",
    "broadcast_seed",
    "centered_ranks",
    "deltas_from_vectors",
    "distributed",
    "functional",
    "noise",
    "perturb",
    "perturbed_parameters",
    "population",
    "sample_normal",
    "sample_rademacher",
    "sample_uniform",
    "shaping",
    "shard",
    "shard_members",
    "z_score",
]
