"""The pruning workflow: which filters to prune, TPP / OCSPruner / baselines, physical pruning.

:class:`TPPLoss` and :class:`TPPPruner` (TPP, DESIGN.md §1.1–1.2), :class:`OCSPruner` (§1.3),
:func:`prune` / :func:`zero_pruned_` / :func:`count_params_flops`, and the baselines of §1.4
(:func:`l1_prune`, :class:`SlimmingLoss`, :func:`slimming_prune`, :func:`scratch_reinit`).
"""
from .attention import HeadPrunedAttention
from .baselines import SlimmingLoss, l1_prune, scratch_reinit, slimming_prune
from .graph import ChannelGroup, channel_groups
from .masks import num_pruned, resolve_ratios, select_keep_masks
from .ocs import OCSPruner, jaccard
from .physical import count_params_flops, prune, zero_pruned_
from .tpp import TPPLoss, reg_schedule
from .tpp_pruner import TPPPruner

__all__ = [
    "ChannelGroup",
    "HeadPrunedAttention",
    "OCSPruner",
    "SlimmingLoss",
    "TPPLoss",
    "TPPPruner",
    "channel_groups",
    "count_params_flops",
    "jaccard",
    "l1_prune",
    "num_pruned",
    "prune",
    "reg_schedule",
    "resolve_ratios",
    "scratch_reinit",
    "select_keep_masks",
    "slimming_prune",
    "zero_pruned_",
]
