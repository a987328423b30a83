"""Pure-PyTorch twin of :func:`fast3d.multiview_attention`: the executable specification.

Multi-view attention as MVDream, Era3D and multi-view PixArt write it: rearrange the per-view
token layout into one sequence per attention group, call ``F.scaled_dot_product_attention`` with
the view mask expanded to a boolean token mask (False = -inf logit), rearrange back.

    layout "views":  (B V) L H D -> B H (V L) D        one group per sample
    layout "rows":   (B V) (h w) H D -> (B h) H (V w) D one group per sample and image row

    out_t = sum_s softmax_s(scale <q_t, k_s> + log m(view(t), view(s))) v_s

with m the view mask (1 where view(t) may attend to view(s), 0 elsewhere). A query view whose
mask row has no True attends to nothing: its output is defined as exactly 0, with no gradient
through it (SDPA alone would return NaN there). Any device and dtype; half precision goes through
SDPA in that precision, like the models do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_groups(x: Tensor,            # [B*V, L, H, D]
              num_views: int, layout: str, image_size: tuple[int, int] | None) -> Tensor:
    """-> [G, H, V*S, D]: G attention groups of V segments of S tokens (S = L or a row of w)."""
    BV, L, H, D = x.shape
    B, V = BV // num_views, num_views
    if layout == "views":
        return x.reshape(B, V, L, H, D).permute(0, 3, 1, 2, 4).reshape(B, H, V * L, D)
    h, w = image_size
    x = x.reshape(B, V, h, w, H, D).permute(0, 2, 4, 1, 3, 5)            # [B, h, H, V, w, D]
    return x.reshape(B * h, H, V * w, D)


def from_groups(y: Tensor,          # [G, H, V*S, D]
                num_views: int, layout: str, image_size: tuple[int, int] | None) -> Tensor:
    """Inverse of :func:`to_groups` -> [B*V, L, H, D]."""
    G, H, VS, D = y.shape
    V = num_views
    if layout == "views":
        L = VS // V
        return y.reshape(G, H, V, L, D).permute(0, 2, 3, 1, 4).reshape(G * V, L, H, D)
    h, w = image_size
    B = G // h
    y = y.reshape(B, h, H, V, w, D).permute(0, 3, 1, 4, 2, 5)            # [B, V, h, w, H, D]
    return y.reshape(B * V, h * w, H, D)


def token_mask(view_mask: Tensor | None,   # [V, V] bool
               seg_q: int, seg_k: int) -> Tensor | None:
    """[V*seg_q, V*seg_k] bool: query token of view i may see key token of view j iff mask[i, j]."""
    if view_mask is None:
        return None
    return view_mask.repeat_interleave(seg_q, 0).repeat_interleave(seg_k, 1)


def multiview_attention(q: Tensor,            # [B*V, Lq, H, D]
                        k: Tensor,            # [B*V, Lk, H, D]
                        v: Tensor,            # [B*V, Lk, H, D]
                        num_views: int,
                        layout: str,
                        image_size: tuple[int, int] | None,
                        view_mask: Tensor | None,   # [V, V] bool
                        scale: float | None) -> Tensor:
    """Returns out [B*V, Lq, H, D] (inputs already validated by the API)."""
    Lq, Lk = q.shape[1], k.shape[1]
    seg_q, seg_k = (Lq, Lk) if layout == "views" else (image_size[1], image_size[1])
    qg, kg, vg = (to_groups(x, num_views, layout, image_size) for x in (q, k, v))
    if view_mask is None:
        out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
        return from_groups(out, num_views, layout, image_size)
    view_mask = view_mask.to(q.device)
    attends = view_mask.any(1)                                           # [V]
    # Rows with no True would softmax over nothing (NaN in SDPA's output and, through P, in every
    # gradient): they attend to all views instead, and their output is replaced by 0 below, so the
    # upstream gradient reaching them is 0 and they add nothing to dq, dk or dv. Device ops only:
    # no host synchronisation.
    mask = token_mask(view_mask | ~attends[:, None], seg_q, seg_k)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    keep = attends.repeat_interleave(seg_q)[:, None]                     # [V*seg_q, 1]
    out = torch.where(keep, out, out.new_zeros(()))
    return from_groups(out, num_views, layout, image_size)
