"""DEQ model families (IGNN, MDEQ, DEQ transformer) and explicit baselines of matched size.

``cdeq.models.get(name, **kwargs)`` builds a model by name; :func:`available` lists the names.
DEQ models (subclasses of :class:`DEQModel`) still need their solver: ``model.set_deq(cdeq.DEQ(...))``
(the tasks in :mod:`cdeq.tasks` build them with it set).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from cdeq.models.explicit import GAT, GCN, ResNet, Transformer
from cdeq.models.ignn import IGNN
from cdeq.models.mdeq import MDEQ
from cdeq.models.protocol import DEQModel
from cdeq.models.transformer import AdaptiveTransformer, DEQTransformer

_REGISTRY: dict[str, type[nn.Module]] = {
    "ignn": IGNN,
    "mdeq": MDEQ,
    "deq-transformer": DEQTransformer,
    "gcn": GCN,
    "gat": GAT,
    "resnet": ResNet,
    "transformer": Transformer,
}


def available() -> list[str]:
    """The names :func:`get` accepts."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with the constructor arguments ``kwargs``."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown model {name!r}; available: {available()}")
    return _REGISTRY[name](**kwargs)


def num_parameters(model: nn.Module) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["DEQModel", "IGNN", "MDEQ", "DEQTransformer", "GCN", "GAT", "ResNet", "Transformer", "AdaptiveTransformer",
           "available", "get", "num_parameters"]
