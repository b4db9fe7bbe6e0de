"""Mixed precision for the DEQ layer f alone.

f is where a DEQ spends its FLOPs; the solver's own arithmetic (Anderson's Gram system of Eq. 9 in
the C-DEQ paper, the residual norms that decide convergence) is cheap and precision-sensitive. So
with ``amp="bf16"`` every call of a :class:`cdeq.models.DEQModel`'s ``layer`` runs under
``torch.autocast(dtype=torch.bfloat16)`` and its output is cast back to the state's dtype: the
solver's buffers and small system, the injection, the readout and the losses stay float32.

:func:`amp_layers` turns it on for a block of code; :class:`cdeq.training.TrainLoop` uses it for
``OptimConfig.amp`` (teacher training, distillation, the baselines), trajectory sampling and the
online teacher for ``Storage.amp``. :func:`cdeq.solve` runs its own ops with autocast off even when
its caller turned autocast on, and calls f under the caller's setting.

Example:
    >>> from cdeq.models import MDEQ
    >>> model = MDEQ(in_channels=1, channels=(8, 8), head_channels=(8, 8, 8), groups=2)
    >>> u = model.inject(torch.zeros(2, 1, 8, 8))
    >>> with amp_layers(model, "bf16"):  # the convolutions run in bfloat16
    ...     z = model.layer(model.init_state(u), u)
    >>> z[0].dtype, model.amp
    (torch.float32, None)
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from cdeq.state import State, as_tuple, map_state

AMP_CHOICES = ("bf16",)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``torch.autocast`` runs bfloat16 on this device (CPU always; CUDA from Ampere on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def check_amp(amp: Optional[str], device: torch.device) -> Optional[str]:
    """``amp`` validated; "bf16" on a device without bf16 autocast warns and runs in full precision."""
    if amp is not None and amp not in AMP_CHOICES:
        raise ValueError(f"amp: expected None or one of {AMP_CHOICES}, got {amp!r}")
    if amp == "bf16" and not bf16_supported(device):
        warnings.warn(f"amp: bf16 autocast is not supported on {device}; f runs in full precision",
                      UserWarning, stacklevel=3)
        return None
    return amp


@contextlib.contextmanager
def amp_layers(module: nn.Module, amp: Optional[str]) -> Iterator[None]:
    """Run every DEQModel layer inside ``module`` under ``amp`` for the block (None: no change).

    Raises ValueError if ``amp`` is set and ``module`` holds no DEQModel (an explicit network has
    no f to autocast)."""
    from cdeq.models.protocol import DEQModel

    if amp is None:
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, DEQModel)]
    if not layers:
        raise ValueError(f"amp: {type(module).__name__} holds no DEQModel, whose layer f amp autocasts")
    amp = check_amp(amp, next((p.device for p in module.parameters()), torch.device("cpu")))
    before = [m.amp for m in layers]
    for m in layers:
        m.amp = amp
    try:
        yield
    finally:
        for m, old in zip(layers, before):
            m.amp = old


def autocast_layer(layer: Callable[..., State]) -> Callable[..., State]:
    """Wrap a DEQModel's ``layer(z, u)`` so that it honours the model's ``amp`` attribute."""
    @functools.wraps(layer)
    def wrapped(self: nn.Module, z: State, u: Any) -> State:
        if self.amp is None:
            return layer(self, z, u)
        with torch.autocast(device_type=as_tuple(z)[0].device.type, dtype=torch.bfloat16):
            out = layer(self, z, u)
        return map_state(lambda o, s: o.to(s.dtype), out, z)
    return wrapped


def caller_autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory restoring the caller's autocast setting on ``device`` (for f inside a
    solver that turned autocast off for its own ops)."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext
    dtype = torch.get_autocast_dtype(device.type)
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def solver_ops(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: a solver's own ops run in the states' dtype."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
