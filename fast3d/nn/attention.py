"""A diffusers attention processor that runs self-attention across views with fast3d's fused
multi-view attention.

Multi-view diffusion UNets and transformers (MVDream, Era3D, multi-view PixArt) keep the views of
a sample along the batch, ``(B V) L C``, and make the self-attention layers see all views by
rearranging to ``B (V L) C`` (or, row-wise, ``(B h) (V w) C``) around a standard attention call.
``MultiViewAttnProcessor`` does that attention directly on the ``(B V)`` layout: the projections
are viewed as [B*V, L, H, D] (no copies) and handed to :func:`multiview_attention`.

    unet.set_attn_processor(MultiViewAttnProcessor(num_views=4))               # MVDream
    unet.set_attn_processor(MultiViewAttnProcessor(num_views=6, layout="rows"))  # Era3D

Cross-attention calls (``encoder_hidden_states`` given) stay per view, exactly diffusers'
``AttnProcessor2_0``, as in those models. ``ImageTokenAttnProcessor`` is the cross-attention of
ImageDream: text tokens and image tokens (the last ``num_tokens`` of ``encoder_hidden_states``)
each with their own keys and values, the two attentions added.
"""

from __future__ import annotations

import math

from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch import Tensor

from fast3d.ops.attention import multiview_attention


class MultiViewAttnProcessor:
    """A diffusers attention processor: self-attention across ``num_views`` consecutive batch
    entries, by :func:`fast3d.multiview_attention`, without rearranging to ``B (V L) C``.

    .. note::
        **Layouts.** ``"views"``: every token attends to all tokens of all views of its sample
        (MVDream, multi-view PixArt). ``"rows"``: the tokens of a view form an (h, w) grid and a
        token attends to its own row in every view (Era3D).

    .. note::
        **Grid size** (``"rows"`` only). ``image_size=(h, w)`` fixes it; without it, a 4-D input
        [B*V, C, h, w] gives its own, and a 3-D input [B*V, L, C] is taken as a square grid
        h = w = sqrt(L) (a UNet's levels differ in size, so one fixed size rarely fits them all).

    .. note::
        **Cross-attention** calls (``encoder_hidden_states`` given) stay per view, exactly
        diffusers' ``AttnProcessor2_0``, as in those models. ``attention_mask`` is refused in
        self-attention: restrict which views see which with ``view_mask``.

    Args:
        num_views: V, the views of one sample (consecutive along the batch).
        layout: ``"views"`` or ``"rows"``. Default ``"views"``.
        image_size: (h, w) token grid of a view for ``"rows"``; None otherwise or to infer it.
        view_mask: bool [V, V]: view i attends to view j only where True; None for all.
        backend: passed to :func:`fast3d.multiview_attention`. Default ``"auto"``.

    Example::

        unet.set_attn_processor(MultiViewAttnProcessor(num_views=4))
    """

    def __init__(self, num_views: int, layout: str = "views", image_size: tuple[int, int] | None = None,
                 view_mask: Tensor | None = None, backend: str = "auto"):
        if layout not in ("views", "rows"):
            raise ValueError(f"layout must be 'views' or 'rows'; got {layout!r}")
        if layout == "views" and image_size is not None:
            raise ValueError(f"image_size is only used with layout='rows'; got {image_size!r}")
        self.num_views, self.layout, self.image_size = num_views, layout, image_size
        self.view_mask, self.backend = view_mask, backend
        self._cross = AttnProcessor2_0()

    def _grid(self, L: int, hw: tuple[int, int] | None) -> tuple[int, int] | None:
        if self.layout == "views":
            return None
        if self.image_size is not None:
            return tuple(self.image_size)
        if hw is not None:
            return hw
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"MultiViewAttnProcessor(layout='rows') needs image_size=(h, w): a 3-D input of "
                             f"L = {L} tokens is not a square grid")
        return side, side

    def __call__(self, attn: Attention,
                 hidden_states: Tensor,                        # [B*V, L, C] or [B*V, C, h, w]
                 encoder_hidden_states: Tensor | None = None,  # [B*V, T, C_cross]
                 attention_mask: Tensor | None = None,
                 temb: Tensor | None = None,
                 *args, **kwargs) -> Tensor:
        """Run one attention layer of diffusers' ``Attention`` (its projections, norms, output
        projection, residual and rescaling) with multi-view self-attention.

        Args:
            attn: the diffusers ``Attention`` module calling this processor.
            hidden_states: tokens, [B*V, L, C] or [B*V, C, h, w].
            encoder_hidden_states: text or image tokens for cross-attention, [B*V, T, C_cross];
                None for self-attention.
            attention_mask: must be None in self-attention (use ``view_mask``).
            temb: the time embedding, for a spatial norm.

        Returns:
            The layer's output, the shape of ``hidden_states``.
        """
        if encoder_hidden_states is not None:  # cross-attention: per view, as in the models
            return self._cross(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("MultiViewAttnProcessor: attention_mask is not supported in multi-view self-attention "
                             "(restrict views with view_mask)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        hw = None
        if hidden_states.ndim == 4:
            BV, C, h, w = hidden_states.shape
            hw = (h, w)
            hidden_states = hidden_states.view(BV, C, h * w).transpose(1, 2)
        BV, L, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)                  # [B*V, L, H*D]
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        H = attn.heads
        D = key.shape[-1] // H
        query, key, value = (x.view(BV, L, H, D) for x in (query, key, value))   # BMHK views, no copies
        if attn.norm_q is not None:   # per-head norms act on the last (head) dim
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = multiview_attention(query, key, value, self.num_views, self.layout, self._grid(L, hw),
                                  self.view_mask, scale=attn.scale, backend=self.backend)   # [B*V, L, H, D]
        hidden_states = out.reshape(BV, L, H * D).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if hw is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(BV, -1, *hw)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ImageTokenAttnProcessor(IPAdapterAttnProcessor2_0):
    """Cross-attention to text tokens plus ``scale`` times cross-attention to image tokens, each
    with its own key / value projections (ImageDream's ``to_k_ip`` / ``to_v_ip``; diffusers'
    IP-Adapter processor, whose weights it holds), taking the image tokens as the last
    ``num_tokens`` entries of a single ``encoder_hidden_states`` tensor.

    Args:
        hidden_size: the attention's inner width (heads x head dim).
        cross_attention_dim: the width of the tokens.
        num_tokens: how many of the last tokens are image tokens.
        scale: the image attention's weight. Default 1.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int, scale: float = 1.0):
        super().__init__(hidden_size, cross_attention_dim, num_tokens=(num_tokens,), scale=scale)

    def __call__(self, attn: Attention,
                 hidden_states: Tensor,                        # [N, L, C] or [N, C, h, w]
                 encoder_hidden_states: Tensor | None = None,  # [N, T + num_tokens, C_cross]: text, then image
                 attention_mask: Tensor | None = None,
                 temb: Tensor | None = None,
                 *args, **kwargs) -> Tensor:
        n = self.num_tokens[0]
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= n:
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"ImageTokenAttnProcessor: encoder_hidden_states must hold text tokens and then "
                             f"{n} image tokens, [N, T + {n}, C]; got {got}")
        split = (encoder_hidden_states[:, :-n], [encoder_hidden_states[:, -n:]])
        return super().__call__(attn, hidden_states, split, attention_mask, temb)
