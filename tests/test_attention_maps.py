"""DAAM cross-attention maps: restoration, exactness against a store-everything reference, conditional rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffseg_utils import load_backbone
from diffseg_utils.attention import ControlledAttnProcessor, attention_layers
from diffseg_utils.attention_maps import CrossAttentionMaps, DAAMResult, daam_segment
from diffseg_utils.hooks import AttentionProcessors
from diffseg_utils.sampling import generate
from diffseg_utils.text import token_span

PROMPTS = ["a photo of a star and a ring", "a photo of a heart"]
WORDS = [["star", "ring"], ["heart", "photo"]]


def _unet_inputs(bb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = bb.latent_resolution
    x = torch.randn(n, bb.latent_channels, r, r, generator=g)
    return x, torch.full((n,), 500), bb.encode_prompt(PROMPTS[:n]).embeds


def _reference_maps(bb, layers, probs_per_layer, resolution, steps=None):
    """Store-everything reference: per layer and call, conditional half, head mean, bicubic, sum / layers."""
    total = 0.0
    for a in layers:
        heads = bb.denoiser.get_submodule(a.path).heads
        h, w = a.resolution
        for step, p in enumerate(probs_per_layer[a.path]):
            if steps is not None and step not in steps:
                continue
            b = p.shape[0] // heads
            cond = torch.stack([p[i * heads:(i + 1) * heads] for i in range(b // 2, b)])  # (n, heads, Q, K)
            m = cond.mean(1).permute(0, 2, 1).reshape(b // 2, -1, h, w)
            if (h, w) != (resolution, resolution):
                m = F.interpolate(m, size=(resolution, resolution), mode="bicubic").clamp(min=0)
            total = total + m
    return total / len(layers)


def test_default_layers_and_bad_backbones(sd_tiny, ddpm_tiny):
    cam = CrossAttentionMaps(sd_tiny)
    # sd_tiny: 8x8 latents, cross-attention at 8/4/2 and the 1x1 mid block; latent // 4 = 2 skips the mid block
    assert {a.resolution[0] for a in cam.layers} == {8, 4, 2}
    assert all(a.cross and not a.path.startswith("mid_block") for a in cam.layers)
    assert len(CrossAttentionMaps(sd_tiny, min_resolution=1).layers) == len(cam.layers) + 1
    with pytest.raises(ValueError, match="unconditional"):
        CrossAttentionMaps(ddpm_tiny)
    with pytest.raises(ValueError, match="min_resolution"):
        CrossAttentionMaps(sd_tiny, min_resolution=16)


def test_forward_unchanged_and_processors_restored(sd_tiny):
    unet = sd_tiny.denoiser
    x, t, c = _unet_inputs(sd_tiny)
    before = dict(unet.attn_processors)
    n_pre_hooks = len(unet._forward_pre_hooks)
    ref = unet(x, t, encoder_hidden_states=c).sample
    with CrossAttentionMaps(sd_tiny, cfg_batch=False) as cam:
        inside = unet(x, t, encoder_hidden_states=c).sample
        with pytest.raises(RuntimeError, match="already installed"):
            cam.__enter__()
    torch.testing.assert_close(inside, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, ref)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert cam.maps.shape == (2, sd_tiny.tokenizer.model_max_length, 8, 8)

    with pytest.raises(KeyError, match="boom"):
        with CrossAttentionMaps(sd_tiny):
            unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([c, c]))
            raise KeyError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert len(unet._forward_pre_hooks) == n_pre_hooks
    assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, ref)


@pytest.mark.parametrize("steps", [None, {1, 2}])
def test_accumulated_maps_equal_reference(sd_tiny, steps):
    kw = dict(num_steps=3, guidance_scale=4.0, seed=3)
    with CrossAttentionMaps(sd_tiny, cfg_batch=True, resolution=16, steps=steps) as cam:
        images = generate(sd_tiny, PROMPTS, **kw)
    procs = {a.path: ControlledAttnProcessor(capture_probs=True) for a in cam.layers}
    with AttentionProcessors(sd_tiny.denoiser, procs):
        ref_images = generate(sd_tiny, PROMPTS, **kw)
    torch.testing.assert_close(images, ref_images, rtol=1e-4, atol=1e-5)
    assert cam.num_calls == 3 and cam.steps_used == sorted(steps or {0, 1, 2})
    ref = _reference_maps(sd_tiny, cam.layers, {k: p.probs for k, p in procs.items()}, 16, steps)
    torch.testing.assert_close(cam.maps, ref, rtol=1e-4, atol=1e-6)

    # word maps: mean over the word's tokens, bicubic to the image, min-max per map
    heat = cam.heatmaps(PROMPTS, WORDS, image_size=32)
    i, word = 0, "ring"
    m = ref[i, token_span(sd_tiny.tokenizer, PROMPTS[i], word)].mean(0)[None, None]
    m = F.interpolate(m, size=(32, 32), mode="bicubic")[0, 0]
    torch.testing.assert_close(heat[i, 1], (m - m.min()) / (m.max() - m.min()), rtol=1e-4, atol=1e-5)


def test_only_conditional_rows_are_used(sd_tiny):
    x, t, cond = _unet_inputs(sd_tiny)
    g = torch.Generator().manual_seed(1)
    maps = []
    for uncond in (sd_tiny.empty_prompt(2).embeds, torch.randn(cond.shape, generator=g)):
        with CrossAttentionMaps(sd_tiny, cfg_batch=True) as cam:
            sd_tiny.denoiser(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]))
        maps.append(cam.maps)
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-4, atol=1e-6)
    # the same as a batch holding only the conditional rows ...
    with CrossAttentionMaps(sd_tiny, cfg_batch=False) as cam:
        sd_tiny.denoiser(x, t, encoder_hidden_states=cond)
    torch.testing.assert_close(cam.maps, maps[0], rtol=1e-4, atol=1e-6)
    # ... and not the unconditional rows' maps
    with CrossAttentionMaps(sd_tiny, cfg_batch=False) as cam:
        sd_tiny.denoiser(x, t, encoder_hidden_states=sd_tiny.empty_prompt(2).embeds)
    assert not torch.allclose(cam.maps, maps[0], atol=1e-4)
    with CrossAttentionMaps(sd_tiny, cfg_batch=True) as cam, pytest.raises(RuntimeError, match="even"):
        sd_tiny.denoiser(x[:1], t[:1], encoder_hidden_states=cond[:1])


def test_heatmaps_masks_and_errors(sd_tiny):
    cam = CrossAttentionMaps(sd_tiny, cfg_batch=True)
    with pytest.raises(RuntimeError, match="before asking"):
        cam.heatmaps(PROMPTS, WORDS)
    with cam:
        generate(sd_tiny, PROMPTS, num_steps=2, guidance_scale=7.5)
    heat = cam.heatmaps(PROMPTS, WORDS)
    assert heat.shape == (2, 2, sd_tiny.resolution, sd_tiny.resolution) and heat.dtype == torch.float32
    assert heat.min() >= 0 and heat.max() <= 1
    torch.testing.assert_close(heat.amin((-2, -1)), torch.zeros(2, 2))
    torch.testing.assert_close(heat.amax((-2, -1)), torch.ones(2, 2))
    masks = cam.masks(PROMPTS, WORDS, threshold=0.4)
    assert masks.dtype == torch.bool and torch.equal(masks, heat > 0.4)
    assert cam.masks(PROMPTS, WORDS, image_size=(16, 24), threshold=0.7).shape == (2, 2, 16, 24)

    with pytest.raises(ValueError, match="does not occur"):
        cam.heatmaps(PROMPTS, [["star"], ["circle"]])
    with pytest.raises(ValueError, match="one prompt"):
        cam.heatmaps(PROMPTS[:1], WORDS[:1])
    # ragged word lists: a shorter list's missing maps are zero, present maps as if asked alone
    ragged = cam.heatmaps(PROMPTS, [WORDS[0], WORDS[1][:1]])
    assert ragged.shape == heat.shape and torch.equal(ragged[1, 1], torch.zeros_like(heat[1, 1]))
    torch.testing.assert_close(ragged[:, 0], heat[:, 0])
    with pytest.raises(ValueError, match="at least one word"):
        cam.heatmaps(PROMPTS, [WORDS[0], []])
    cam.reset()
    with pytest.raises(RuntimeError, match="no cross-attention maps"):
        cam.maps
    with CrossAttentionMaps(sd_tiny, steps={5}) as cam:
        generate(sd_tiny, PROMPTS, num_steps=2, guidance_scale=7.5)
    with pytest.raises(RuntimeError, match="selected none"):
        cam.heatmaps(PROMPTS, WORDS)


def test_daam_segment_and_composition_with_feature_capture(sd_tiny):
    from diffseg_utils.grounding.features import generate_with_features

    kw = dict(num_steps=2, guidance_scale=5.0, seed=0)
    res = daam_segment(sd_tiny, PROMPTS, ["star", "heart"], threshold=0.5, **kw)
    assert isinstance(res, DAAMResult)
    assert res.images.shape == (2, 3, 64, 64) and res.heatmaps.shape == res.masks.shape == (2, 1, 64, 64)
    assert torch.equal(res.masks, res.heatmaps > 0.5)
    # the context manager only observes: it composes with a wrapper that adds its own forward hooks
    with CrossAttentionMaps(sd_tiny, cfg_batch=True) as cam:
        batch = generate_with_features(sd_tiny, PROMPTS, **kw)
    torch.testing.assert_close(batch.images, res.images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cam.heatmaps(PROMPTS, ["star", "heart"]), res.heatmaps, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", device="cpu")


def test_toy_layers_and_maps(toy):
    cam = CrossAttentionMaps(toy)
    # every cross-attention layer of the toy UNet (16, 8 and the 4x4 mid block) is kept by default
    assert sorted({a.resolution[0] for a in cam.layers}) == [4, 8, 16]
    assert len(cam.layers) == sum(a.cross for a in attention_layers(toy)) == 7
    res = daam_segment(toy, ["a photo of a star and a ring"], [["star", "ring"]], num_steps=4, guidance_scale=5.0)
    assert res.heatmaps.shape == (1, 2, 64, 64) and torch.equal(res.masks, res.heatmaps > 0.4)
    # where the maps are right is tested with forced attention (test_maps_peak_where_the_attention_is_forced)


class _ForcedQuery(torch.nn.Module):
    """to_q replacement: +c inside a known square of the token grid, -c outside (every head, every channel)."""

    def __init__(self, inner: int, box: tuple[float, float, float, float], c: float = 3.0):
        super().__init__()
        self.inner, self.box, self.c = inner, box, c

    def forward(self, h):
        b, n, _ = h.shape
        side = round(n ** 0.5)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        y0, y1, x0, x1 = (round(v * side) for v in self.box)
        inside = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).flatten()          # (n,)
        sign = torch.where(inside, 1.0, -1.0).to(h.dtype)
        return (self.c * sign)[None, :, None].expand(b, n, self.inner).contiguous()


class _ForcedKey(torch.nn.Module):
    """to_k replacement: token positions ``tokens`` get a key of +c everywhere, every other token 0."""

    def __init__(self, inner: int, tokens: list[int], c: float = 3.0):
        super().__init__()
        self.inner, self.tokens, self.c = inner, tokens, c

    def forward(self, e):
        k = torch.zeros(*e.shape[:2], self.inner, dtype=e.dtype)
        k[:, self.tokens] = self.c
        return k


def test_maps_peak_where_the_attention_is_forced(sd_tiny):
    """Known answer: make the word 'ring' win the attention softmax exactly inside a square of every
    cross-attention layer's grid (and lose it outside); its heat map must peak in that square, and
    a word that gets no attention there ('star') must be low in it."""
    prompt = PROMPTS[0]
    box = (0.25, 0.75, 0.5, 1.0)  # rows 1/4..3/4, right half (fractions of the grid)
    ring = token_span(sd_tiny.tokenizer, prompt, "ring")
    layers = [sd_tiny.denoiser.get_submodule(a.path) for a in attention_layers(sd_tiny) if a.cross]
    saved = [(m.to_q, m.to_k) for m in layers]
    try:
        for m in layers:
            inner = m.to_q.out_features
            m.to_q, m.to_k = _ForcedQuery(inner, box), _ForcedKey(inner, ring)
        x, t, _ = _unet_inputs(sd_tiny, n=1)
        with CrossAttentionMaps(sd_tiny, cfg_batch=False) as cam:
            sd_tiny.denoiser(x, t, encoder_hidden_states=sd_tiny.encode_prompt([prompt]).embeds)
        heat = cam.heatmaps([prompt], [["ring", "star"]], image_size=32)[0]              # (2, 32, 32)
    finally:
        for m, (q, k) in zip(layers, saved):
            m.to_q, m.to_k = q, k
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:24, 16:32] = True
    ring_map, star_map = heat
    peak = int(ring_map.flatten().argmax())
    assert inside.flatten()[peak], "the 'ring' map does not peak inside the forced square"
    assert ring_map[inside].mean() > 0.8 and ring_map[~inside].mean() < 0.2
    assert star_map[inside].mean() < star_map[~inside].mean()
    # the DAAM mask (threshold 0.4) is the square, up to the bicubic edge
    mask = heat[0] > 0.4
    assert (mask == inside).float().mean() > 0.9
