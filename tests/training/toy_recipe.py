"""A tiny regression recipe that exercises the training loop (2 ranks, kill, resume) in seconds.

``TOY_KILL_AT=N`` makes rank 0 SIGKILL itself at step N, as a machine failure would."""

from __future__ import annotations

import os
import signal

import torch
from torch.utils.data import IterableDataset

from fast3d.training.loop import Recipe


class ToyData(IterableDataset):
    def __init__(self, rank: int, world: int, n: int = 40):
        self.rank, self.world, self.n, self.epoch = rank, world, n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
        w = torch.arange(8.0).reshape(2, 4) / 8
        for i in order[self.rank::self.world].tolist():
            x = torch.randn(4, generator=torch.Generator().manual_seed(i))
            yield {"x": x, "y": w @ x, "key": f"s{i}"}


class ToyRecipe(Recipe):
    name = "toy"

    def build_model(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def dataset(self, rank, world):
        return ToyData(rank, world)

    def loss(self, model, batch, ctx):
        if int(os.environ.get("TOY_KILL_AT", 0)) == ctx.step + 1 and ctx.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        noise = 0.01 * torch.randn(batch["x"].shape, generator=ctx.generator)
        pred = model((batch["x"] + noise).to(ctx.device, ctx.dtype))
        loss = (pred.float() - batch["y"].to(ctx.device)).pow(2).mean()
        if self.cfg.loss.get("nan_at") == ctx.step + 1:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach(), "noise": noise.abs().mean()}

    def export(self, module, path):
        from fast3d.models.checkpoints import save_pretrained
        from fast3d.training.config import RunConfig

        save_pretrained(path, "toy", RunConfig(recipe="toy"), module.state_dict())
