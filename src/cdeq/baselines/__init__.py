"""Baselines for C-DEQ: HyperDEQ (a learned initialiser and Anderson mixing) and the direct student."""
from cdeq.baselines.direct import train_direct
from cdeq.baselines.hyperdeq import HyperDEQ, train_hyperdeq

__all__ = ["HyperDEQ", "train_hyperdeq", "train_direct"]
