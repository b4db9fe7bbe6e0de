"""Baselines for C-DEQ: HyperDEQ (a learned initialiser and Anderson mixing) and the direct student."""
from cdeq.baselines.direct import DirectLoss, train_direct
from cdeq.baselines.hyperdeq import HyperDEQ, HyperDEQLoss, train_hyperdeq

__all__ = ["HyperDEQ", "HyperDEQLoss", "train_hyperdeq", "DirectLoss", "train_direct"]
