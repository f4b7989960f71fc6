"""Placing requests across engines: prefix summaries replicas report, and the cost-based
choice a router makes from them. Plain computation: no Ray needed (``erllama.ray`` runs it
inside Ray Serve)."""

from .policy import CostModel as CostModel
from .policy import ReplicaView as ReplicaView
from .policy import Score as Score
from .policy import rank_replicas as rank_replicas
from .prefixes import BLOCK as BLOCK
from .prefixes import PrefixSummary as PrefixSummary
from .prefixes import chain_hashes as chain_hashes
from .router import PrefixDirectory as PrefixDirectory
from .router import Router as Router

__all__ = [
    "BLOCK",
    "CostModel",
    "PrefixSummary",
    "ReplicaView",
    "Score",
    "chain_hashes",
    "rank_replicas",
]
