"""An attention processor that exposes what segmentation methods need, and finds layers by resolution.

:class:`ControlledAttnProcessor` computes what diffusers' attention processors do (fused
``scaled_dot_product_attention`` when no probabilities are needed; the classic explicit softmax
when they are), and optionally

* ``capture_query``: stores the query vectors ``to_q(norm(h))`` (EmerDiff's k-means input);
* ``capture_probs``: stores the attention probabilities (cross-attention heat maps, DAAM);
* ``inject_from``: uses batch element ``inject_from``'s probabilities for every element
  (EmerDiff's attention injection: modulated runs reuse the unmodulated run's maps); the one
  ``(heads, N, L)`` map is computed once and broadcast, never copied per element;
* ``add_output``: adds a tensor to the layer output after the output projection (EmerDiff's
  modulation), shaped like the output (``(B, N, C)`` tokens or ``(B, C, H, W)``) or broadcastable.

Install it with :class:`diffseg_utils.hooks.AttentionProcessors` (restores the originals).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbones import Backbone


class ControlledAttnProcessor:
    """diffusers' attention math with capture / injection / output modulation switches.

    When no probabilities are needed (no ``capture_probs``, no ``inject_from``) it runs
    :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels, the probabilities are
    never materialised); otherwise the classic ``AttnProcessor`` math (explicit softmax).

    Captured tensors: ``query`` ``(B, N, heads * d)`` in the layer's dtype (``to_q`` output, before
    any q-norm); ``probs`` a list, one entry per call, ``(B * heads, N, L)`` — or, with
    ``inject_from``, the single shared map ``(heads, N, L)`` every element used.
    """

    def __init__(self, capture_query: bool = False, capture_probs: bool = False):
        self.capture_query = capture_query
        self.capture_probs = capture_probs
        self.inject_from: int | None = None
        self.add_output: torch.Tensor | None = None
        self.enabled = True          # False: behave exactly like the plain processor
        self.query: torch.Tensor | None = None
        self.probs: list[torch.Tensor] = []

    @staticmethod
    def _split(attn, x: torch.Tensor, norm) -> torch.Tensor:
        """(B, N, heads * d) -> (B, heads, N, d), with the layer's q/k norm when it has one."""
        b, n, _ = x.shape
        x = x.view(b, n, attn.heads, -1).transpose(1, 2)
        return norm(x) if norm is not None else x

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq = (hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)  # (B * heads, 1 | N, L) or None
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)                                            # (B, N, heads * d)
        if self.enabled and self.capture_query:
            self.query = query.detach()
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)                                      # (B, L, heads * d)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        B, N = query.shape[:2]
        q = self._split(attn, query, getattr(attn, "norm_q", None))                 # (B, heads, N, d)
        k = self._split(attn, key, getattr(attn, "norm_k", None))                   # (B, heads, L, d)
        L, d = k.shape[2], k.shape[3]
        if self.enabled and self.inject_from is not None:
            # EmerDiff's attention injection: element i's probabilities, shared by every element. The
            # batch is folded into value's columns, so the (heads, N, L) map is never copied B times.
            i = self.inject_from
            m1 = attention_mask[i * heads:(i + 1) * heads] if attention_mask is not None else None
            probs = attn.get_attention_scores(q[i].contiguous(), k[i].contiguous(), m1)   # (heads, N, L)
            if self.capture_probs:
                self.probs.append(probs.detach())
            v = value.view(B, L, heads, d).permute(2, 1, 0, 3).reshape(heads, L, B * d)
            out = torch.bmm(probs, v.to(probs.dtype))                               # (heads, N, B * d)
            hidden_states = out.view(heads, N, B, d).permute(2, 1, 0, 3).reshape(B, N, heads * d)
        elif self.enabled and self.capture_probs:
            probs = attn.get_attention_scores(q.reshape(B * heads, N, d), k.reshape(B * heads, L, d), attention_mask)
            self.probs.append(probs.detach())                                       # (B * heads, N, L)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
        else:
            v = value.view(B, L, heads, d).transpose(1, 2)                          # (B, heads, L, d)
            mask = attention_mask.view(B, heads, -1, L) if attention_mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=attn.scale)
            hidden_states = out.transpose(1, 2).reshape(B, N, heads * d).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if self.enabled and self.add_output is not None:
            hidden_states = hidden_states + self.add_output.to(hidden_states)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass(frozen=True)
class AttentionLayer:
    """An attention layer of the denoiser: its path, whether it is cross-attention, and its token grid."""

    path: str           # e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    cross: bool
    resolution: tuple[int, int]
    block: str          # the hookable block it lives in, e.g. "up_blocks.1.attentions.0", "transformer_blocks.3"


def attention_layers(backbone: Backbone) -> list[AttentionLayer]:
    """Every self- or cross-attention module (diffusers ``Attention``) in definition order, with its grid.

    UNets: their attention blocks' layers; PixArt: ``attn1`` / ``attn2`` of each block; SD3.5's
    extra image self-attention. Joint text/image attention (SD3, Flux) is not listed: its maps
    come from :mod:`diffseg_utils.joint_attention`.
    """
    from diffusers.models.attention_processor import Attention

    blocks = backbone.blocks()
    out = []
    for path, m in backbone.denoiser.named_modules():
        if not isinstance(m, Attention) or getattr(m, "added_kv_proj_dim", None) is not None:
            continue
        parents = [b for b in blocks if path == b or path.startswith(b + ".")]
        if parents:
            parent = max(parents, key=len)
            out.append(AttentionLayer(path, bool(m.is_cross_attention), blocks[parent].resolution, parent))
    return out


def low_res_query_layer(backbone: Backbone) -> AttentionLayer:
    """EmerDiff's layer: the first cross-attention of the lowest-resolution up-block level that has one
    (SD 1.x: ``up_blocks.1.attentions.0.transformer_blocks.0.attn2`` at 16x16); self-attention for
    unconditional UNets (no cross-attention anywhere)."""
    layers = [a for a in attention_layers(backbone) if a.path.startswith("up_blocks")]
    if not layers:
        raise ValueError("this UNet has no attention layer in its up blocks; EmerDiff needs one")
    cross = [a for a in layers if a.cross] or layers
    lowest = min(a.resolution[0] * a.resolution[1] for a in cross)
    return next(a for a in cross if a.resolution[0] * a.resolution[1] == lowest)



def finer_up_layer(backbone: Backbone) -> AttentionLayer | None:
    """The first attention layer of the next finer up-block level than :func:`low_res_query_layer`'s
    (same kind: cross or self), or None when there is none: EmerDiff's alternative modulated layer."""
    q = low_res_query_layer(backbone)
    finer = [a for a in attention_layers(backbone) if a.path.startswith("up_blocks.") and a.cross == q.cross
             and a.resolution[0] > q.resolution[0]]
    return min(finer, key=lambda a: a.resolution[0], default=None)
