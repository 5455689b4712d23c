"""An attention processor that exposes what segmentation methods need, and finds layers by resolution.

:class:`ControlledAttnProcessor` computes exactly what diffusers' classic ``AttnProcessor`` does
(explicit softmax, so the probabilities exist), and optionally

* ``capture_query``: stores the query vectors ``to_q(norm(h))`` (EmerDiff's k-means input);
* ``capture_probs``: stores the attention probabilities (cross-attention heat maps, DAAM);
* ``inject_from``: uses batch element ``inject_from``'s probabilities for every element
  (EmerDiff's attention injection: modulated runs reuse the unmodulated run's maps);
* ``add_output``: adds a tensor to the layer output after the output projection (EmerDiff's
  modulation), shaped like the output (``(B, N, C)`` tokens or ``(B, C, H, W)``) or broadcastable.

Install it with :class:`diffseg_utils.hooks.AttentionProcessors` (restores the originals).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbones import Backbone


class ControlledAttnProcessor:
    """diffusers' AttnProcessor math with capture / injection / output modulation switches."""

    def __init__(self, capture_query: bool = False, capture_probs: bool = False):
        self.capture_query = capture_query
        self.capture_probs = capture_probs
        self.inject_from: int | None = None
        self.add_output: torch.Tensor | None = None
        self.enabled = True          # False: behave exactly like the plain processor
        self.query: torch.Tensor | None = None
        self.probs: list[torch.Tensor] = []

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
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if self.enabled and self.capture_query:
            self.query = query.detach()
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        if self.enabled and self.inject_from is not None:
            # probabilities of one element, reused by all: (heads, Q, K) -> (B * heads, Q, K)
            i = self.inject_from
            q1 = attn.head_to_batch_dim(query[i:i + 1])
            k1 = attn.head_to_batch_dim(key[i:i + 1])
            m1 = attention_mask[i * heads:(i + 1) * heads] if attention_mask is not None else None
            probs = attn.get_attention_scores(q1, k1, m1).repeat(query.shape[0], 1, 1)
        else:
            probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attention_mask)
        if self.enabled and self.capture_probs:
            self.probs.append(probs.detach())
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
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
    """An attention layer of the UNet: its path, whether it is cross-attention, and its token grid."""

    path: str           # e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    cross: bool
    resolution: tuple[int, int]
    block: str          # the hookable block it lives in, e.g. "up_blocks.1.attentions.0"


def attention_layers(backbone: Backbone) -> list[AttentionLayer]:
    """Every diffusers ``Attention`` module of the UNet, in definition order, with its resolution."""
    from diffusers.models.attention_processor import Attention

    blocks = backbone.blocks()
    out = []
    for path, m in backbone.unet.named_modules():
        if isinstance(m, Attention):
            parent = next((b for b in blocks if (path == b or path.startswith(b + ".")) and blocks[b].kind == "attention"), None)
            if parent is None:
                continue
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
