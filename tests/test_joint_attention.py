"""ConceptAttention and joint cross-attention: never feed back, and equal a plain computation."""
from __future__ import annotations

import pytest
import torch

from diffseg_utils.joint_attention import JointAttentionMaps, concept_attention, concept_tokens, joint_blocks

CONCEPTS = ["star", "ring", "background"]


def _inputs(bb, n=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, bb.latent_channels, bb.latent_resolution, bb.latent_resolution, generator=g)
    return x, torch.full((n,), 600.0), bb.encode_prompt(["a photo of a star and a ring"] * n)


def test_generation_is_bitwise_unchanged(sd3_micro):
    bb = sd3_micro
    x, t, cond = _inputs(bb)
    plain = bb.predict(x, t, cond)
    with JointAttentionMaps(bb, concepts=CONCEPTS) as jam:
        hooked = bb.predict(x, t, cond)
    assert torch.equal(plain, hooked)
    assert jam.concept_maps.shape == (2, 3, 8, 8) and jam.maps.shape == (2, 16, 8, 8)
    torch.testing.assert_close(jam.concept_maps.sum(1), torch.ones(2, 8, 8))
    procs = {n: type(m.processor) for n, m in bb.denoiser.named_modules() if hasattr(m, "processor")}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bb.denoiser.modules())
    assert hooks == 0 and all(p.__name__ == "JointAttnProcessor2_0" for p in procs.values())


def _plain_attention(attn, x_img, x_txt):
    """softmax(QK^T / sqrt(d)) V over the joint [image, text] sequence, per head, before any output projection."""
    d = attn.head_dim if hasattr(attn, "head_dim") else attn.inner_dim // attn.heads
    sp = lambda y: y.unflatten(-1, (-1, d)).transpose(1, 2)                      # (B, heads, S, d)
    q = torch.cat([attn.norm_q(sp(attn.to_q(x_img))), attn.norm_added_q(sp(attn.add_q_proj(x_txt)))], 2)
    k = torch.cat([attn.norm_k(sp(attn.to_k(x_img))), attn.norm_added_k(sp(attn.add_k_proj(x_txt)))], 2)
    v = torch.cat([sp(attn.to_v(x_img)), sp(attn.add_v_proj(x_txt))], 2)
    p = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)
    out = (p @ v).transpose(1, 2).flatten(2)                                     # (B, S, W)
    N = x_img.shape[1]
    return out[:, :N], out[:, N:], p[..., :N, N:].mean(1)                         # image out, text out, img->text probs


@pytest.mark.parametrize("layer", [0, 2])
def test_maps_equal_a_plain_computation(sd3_micro, layer):
    """The concept stream through blocks < layer by the blocks' own forward, then the attention by hand."""
    bb = sd3_micro
    x, t, cond = _inputs(bb)
    blocks = bb.denoiser.transformer_blocks
    inputs = {}
    hs = [blk.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, kw), with_kwargs=True)
          for i, blk in enumerate(blocks)]
    try:
        bb.predict(x, t, cond)
    finally:
        for h in hs:
            h.remove()
    c = bb.denoiser.context_embedder(concept_tokens(bb, CONCEPTS))[None].expand(2, -1, -1)
    for i in range(layer):
        c, _ = blocks[i](hidden_states=inputs[i]["hidden_states"], encoder_hidden_states=c, temb=inputs[i]["temb"])
    kw, blk = inputs[layer], blocks[layer]
    img_in = blk.norm1(kw["hidden_states"], emb=kw["temb"])[0]
    img_out, _, cross = _plain_attention(blk.attn, img_in, blk.norm1_context(kw["encoder_hidden_states"], emb=kw["temb"])[0])
    _, con_out, _ = _plain_attention(blk.attn, img_in, blk.norm1_context(c, emb=kw["temb"])[0])
    want = torch.einsum("bnw,bkw->bkn", img_out, con_out).softmax(1).view(2, 3, 8, 8)
    with JointAttentionMaps(bb, concepts=CONCEPTS, layers=[layer]) as jam:
        bb.predict(x, t, cond)
    torch.testing.assert_close(jam.concept_maps, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(jam.maps, cross.transpose(1, 2).reshape(2, -1, 8, 8), atol=1e-6, rtol=1e-4)


def test_concept_attention_on_images_and_errors(sd3_micro):
    bb = sd3_micro
    imgs = [torch.rand(3, 32, 32), torch.rand(3, 24, 40)]
    res = concept_attention(bb, imgs, CONCEPTS, timesteps=[300, 700], layers=[1, 2])
    assert [tuple(m.shape) for m in res.maps] == [(3, 32, 32), (3, 24, 40)]
    assert [tuple(lab.shape) for lab in res.labels] == [(32, 32), (24, 40)]
    assert joint_blocks(bb) == [0, 1, 2]  # the last block is context_pre_only: no continuing text stream
    with pytest.raises(ValueError, match="eligible"):
        JointAttentionMaps(bb, concepts=CONCEPTS, layers=[3])
    only = JointAttentionMaps(bb, concepts=CONCEPTS, layers=[1], cross=False)
    with only:
        bb.predict(*_inputs(bb, 1))
    assert only.concept_maps.shape == (1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="cross=True"):
        only.maps
    with pytest.raises(ValueError, match="nothing to record"):
        JointAttentionMaps(bb, cross=False)
    with pytest.raises(ValueError, match="concepts is empty"):
        concept_attention(bb, imgs, [])


def test_unets_are_refused_with_the_alternative(sd_tiny):
    with pytest.raises(ValueError, match="daam_segment"):
        JointAttentionMaps(sd_tiny, concepts=CONCEPTS)


def test_concept_attention_miou_equals_a_plain_scoring(sd3_micro):
    """The multi-class protocol: concepts = classes + background, argmax, class ids shifted by one, batched
    scoring = one confusion matrix over all images."""
    import numpy as np

    from diffseg_utils.joint_attention import concept_attention, concept_attention_miou
    from diffseg_utils.metrics import mean_iou

    r = sd3_micro.resolution
    g = torch.Generator().manual_seed(3)
    imgs = torch.rand(5, 3, r, r, generator=g)
    labels = torch.randint(0, 3, (5, r, r), generator=g)
    labels[0, 0, 0] = 255                                               # an ignored pixel
    miou, ious = concept_attention_miou(sd3_micro, imgs, labels, ["star", "circle"], batch_size=2, timesteps=(300,))
    preds = []
    for s in range(0, 5, 2):
        lab = concept_attention(sd3_micro, imgs[s:s + 2], ["star", "circle", "background"], timesteps=(300,), seed=s).labels
        preds.append((lab + 1) % 3)
    want = mean_iou(torch.cat(preds), labels, 3, ignore_index=255)
    assert abs(miou - want) < 1e-9 and ious.shape == (3,) and np.isfinite(ious).all()
