"""Point-set metrics between a prediction and a reference: Chamfer distance and F-score, with
optional per-point weights on the prediction (a Gaussian's opacity: faint Gaussians count less)."""

from __future__ import annotations

import torch
from torch import Tensor


def _nearest(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:  # [N, 3], [M, 3] -> [N] distances
    out = []
    for i in range(0, a.shape[0], chunk):
        out.append(torch.cdist(a[i:i + chunk].double(), b.double()).min(1).values)
    return torch.cat(out).float()


def chamfer_fscore(pred: Tensor,          # [N, 3]
                   ref: Tensor,           # [M, 3]
                   weights: Tensor | None = None,  # [N] >= 0, e.g. opacities
                   threshold: float = 0.02,
                   min_weight: float = 0.05) -> dict:
    """Symmetric Chamfer distance (mean of the two mean nearest-neighbour distances, not squared)
    and F-score at ``threshold``. Prediction -> reference terms are weighted by ``weights``;
    reference -> prediction uses the predicted points of weight >= ``min_weight``."""
    if pred.dim() != 2 or pred.shape[-1] != 3 or ref.dim() != 2 or ref.shape[-1] != 3:
        raise ValueError(f"pred and ref must be point sets [N, 3]; got {tuple(pred.shape)} and {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError("ref has no points")
    w = torch.ones(pred.shape[0]) if weights is None else weights.detach().float().cpu()
    if w.shape != (pred.shape[0],) or (w < 0).any():
        raise ValueError(f"weights must be [N] = [{pred.shape[0]}], >= 0; got {tuple(w.shape)}")
    pred, ref = pred.detach().float().cpu(), ref.detach().float().cpu()
    kept = pred[w >= min_weight]
    if kept.shape[0] == 0 or w.sum() <= 0:
        return {"chamfer": float("inf"), "fscore": 0.0, "precision": 0.0, "recall": 0.0}
    d_pr = _nearest(pred, ref)
    d_rp = _nearest(ref, kept)
    acc = float((w * d_pr).sum() / w.sum())
    comp = float(d_rp.mean())
    precision = float((w * (d_pr < threshold)).sum() / w.sum())
    recall = float((d_rp < threshold).float().mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"chamfer": 0.5 * (acc + comp), "fscore": f, "precision": precision, "recall": recall}
