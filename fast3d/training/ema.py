"""Exponential moving average of the trainable weights, correct under every ZeRO stage.

Each rank averages the part of each parameter it holds: the whole parameter under ZeRO-0/1/2, its
partition (``ds_tensor``) under ZeRO-3, so the EMA is partitioned exactly as the weights are and
costs 4 bytes per locally held element. The average is kept in fp32; its input is the working copy
of the weights (bf16 in a bf16 run).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor


def _local(p: Tensor) -> Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        self.decay = decay
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_local(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's part: ``ema.<name>`` -> fp32 tensor."""
        return {f"ema.{n}": s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for n, s in zip(self.names, self.shadow):
            key = f"ema.{n}"
            if key not in state or state[key].shape != s.shape:
                raise ValueError(f"EMA state lacks {key!r} of shape {tuple(s.shape)} (another model or ZeRO layout?)")
            s.copy_(state[key])

    @contextmanager
    def swapped_in(self):
        """Inside the block the module's weights are the EMA's (e.g. to evaluate or export them)."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    _local(p).copy_(b)
