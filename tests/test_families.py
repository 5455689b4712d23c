"""Today's families (SDXL, SD3 / SD3.5, Flux, PixArt-Σ) at their real configurations, layers reduced.

Each directory is written with ``save_pretrained`` and loaded by ``load_backbone(dir)``. The
equivalence tests hold our code against the diffusers pipeline built on the very same weights:
the text conditioning equals ``pipe.encode_prompt``, and ``generate`` equals ``pipe(...)`` from the
same initial latents (with the pipeline's scheduler set to the one ``backbone.sampler`` uses).
"""
from __future__ import annotations

import pytest
import torch

from diffseg_utils import extract_features, load_backbone
from diffseg_utils.backbones import FlowNoise, FluxBackbone, PixArtBackbone, SD3Backbone, SDXLBackbone
from diffseg_utils.backbones.flux import pack, unpack
from diffseg_utils.sampling import generate
from families import WRITERS

CLASSES = {"sdxl": SDXLBackbone, "sd3": SD3Backbone, "flux": FluxBackbone, "pixart": PixArtBackbone}
WIDTH = {"sd3": 1536, "flux": 3072, "pixart": 1152}  # transformer width = feature channels
PROMPTS = ["a photo of a star", "a photo of a ring and a heart"]


@pytest.fixture(scope="module", params=list(WRITERS))
def family(request, tmp_path_factory):
    name = request.param
    path = WRITERS[name](tmp_path_factory.mktemp(name))
    bb = load_backbone(str(path), device="cpu", **({"sample_size": 16} if name == "flux" else {}),
                       **({"max_sequence_length": 32} if name in ("sd3", "flux", "pixart") else {}))
    return name, path, bb


def _pipeline(name: str, bb):
    """The diffusers pipeline on the backbone's own modules, sampling with the scheduler our sampler uses."""
    from diffusers import (DDIMScheduler, FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline,
                           StableDiffusionXLPipeline)

    te, tk = bb.text_encoders, bb.tokenizers
    if name == "sdxl":
        return StableDiffusionXLPipeline(vae=bb.vae, text_encoder=te[0], text_encoder_2=te[1], tokenizer=tk[0],
                                         tokenizer_2=tk[1], unet=bb.denoiser,
                                         scheduler=DDIMScheduler.from_config(bb.scheduler.config))
    if name == "sd3":
        return StableDiffusion3Pipeline(transformer=bb.denoiser, scheduler=bb.scheduler, vae=bb.vae, text_encoder=te[0],
                                        tokenizer=tk[0], text_encoder_2=te[1], tokenizer_2=tk[1], text_encoder_3=te[2],
                                        tokenizer_3=tk[2])
    if name == "flux":
        return FluxPipeline(transformer=bb.denoiser, scheduler=bb.scheduler, vae=bb.vae, text_encoder=te[0],
                            tokenizer=tk[0], text_encoder_2=te[1], tokenizer_2=tk[1])
    return PixArtSigmaPipeline(transformer=bb.denoiser, scheduler=DDIMScheduler.from_config(bb.scheduler.config),
                               vae=bb.vae, text_encoder=te[0], tokenizer=tk[0])


@pytest.mark.slow
def test_loads_as_its_family_with_blocks_as_maps(family):
    name, _, bb = family
    assert type(bb) is CLASSES[name] and bb.kind == "latent" and bb.is_conditional
    blocks = bb.blocks()
    if name == "sdxl":
        assert {b.channels for b in blocks.values() if b.name.startswith("up_blocks")} >= {320, 640, 1280}
    else:
        grid = bb.latent_resolution // bb._denoiser_stride()
        assert blocks and all(b.resolution == (grid, grid) and b.channels == WIDTH[name] for b in blocks.values())
    kinds = {b.kind for b in blocks.values()}
    assert kinds == {"sdxl": {"block", "resnet", "attention", "upsampler", "downsampler"}, "sd3": {"joint"},
                     "flux": {"joint", "single"}, "pixart": {"block"}}[name]


@pytest.mark.slow
def test_text_conditioning_equals_the_pipeline(family):
    name, _, bb = family
    pipe = _pipeline(name, bb)
    c = bb.encode_prompt(PROMPTS)
    if name == "sdxl":
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        want = (emb, pooled, None)
    elif name == "sd3":
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                               max_sequence_length=bb.max_sequence_length)
        want = (emb, pooled, None)
    elif name == "flux":
        emb, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=bb.max_sequence_length)
        want = (emb, pooled, None)
    else:
        emb, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                             max_sequence_length=bb.max_sequence_length)
        want = (emb, None, mask)
    for ours, theirs in zip((c.embeds, c.pooled, c.mask), want):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs.to(ours.dtype))


@pytest.mark.slow
def test_generate_equals_the_pipeline(family):
    """Two steps with guidance (Flux: its embedded guidance) from the same initial latents."""
    name, _, bb = family
    pipe = _pipeline(name, bb)
    r = bb.latent_resolution
    x0 = torch.stack([torch.randn(bb.latent_channels, r, r, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    g = 1.0 if name == "flux" else 4.0
    ours = generate(bb, PROMPTS, num_steps=2, guidance_scale=g, seed=[3, 4], return_latents=True)
    kw = dict(num_inference_steps=2, output_type="latent", height=bb.resolution, width=bb.resolution)
    if name == "flux":
        theirs = unpack(pipe(PROMPTS, guidance_scale=bb.guidance, latents=pack(x0), max_sequence_length=bb.max_sequence_length,
                             **kw).images, r, r)
    elif name == "sd3":
        theirs = pipe(PROMPTS, guidance_scale=g, latents=x0, max_sequence_length=bb.max_sequence_length, **kw).images
    elif name == "pixart":
        theirs = pipe(PROMPTS, guidance_scale=g, latents=x0, max_sequence_length=bb.max_sequence_length,
                      use_resolution_binning=False, **kw).images
    else:
        theirs = pipe(PROMPTS, guidance_scale=g, latents=x0, **kw).images
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_features_of_a_batch_equal_one_image_at_a_time(family):
    name, _, bb = family
    block = list(bb.blocks())[-1]
    x = torch.rand(2, 3, bb.resolution, bb.resolution)
    both = extract_features(bb, x, [block], [250], dtype=torch.float32, progress=False)
    for i in range(2):
        one = extract_features(bb, x[i:i + 1], [block], [250], dtype=torch.float32, progress=False)
        torch.testing.assert_close(both.maps[(250, block)][i:i + 1], one.maps[(250, block)], atol=1e-4, rtol=1e-4)


def test_flow_step_equals_the_scheduler_step():
    """FlowNoise.step between grid points == FlowMatchEulerDiscreteScheduler.step (shift 3, as SD3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    noise = FlowNoise(sched)
    ref = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
    ref.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    ts = ref.timesteps.tolist()
    for i, t in enumerate(ts):
        want = ref.step(v, ref.timesteps[i], x).prev_sample
        torch.testing.assert_close(noise.step(v, t, ts[i + 1] if i + 1 < len(ts) else None, x), want)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([250.0, 750.0])
    torch.testing.assert_close(noise.add_noise(x0, t, v), (1 - t / 1000).view(-1, 1, 1, 1) * x0 + (t / 1000).view(-1, 1, 1, 1) * v)


@pytest.mark.slow
def test_joint_attention_maps_leave_generation_bitwise_unchanged(family):
    """ConceptAttention and joint cross-attention on the MM-DiTs (Flux: rotary positions, concepts at zero)."""
    from diffseg_utils.joint_attention import JointAttentionMaps

    name, _, bb = family
    if name not in ("sd3", "flux"):
        with pytest.raises(ValueError, match="daam_segment"):
            JointAttentionMaps(bb, concepts=["star", "background"])
        return
    r = bb.latent_resolution
    x = torch.randn(1, bb.latent_channels, r, r, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompt(PROMPTS[:1])
    plain = bb.predict(x, 600, cond)
    with JointAttentionMaps(bb, concepts=["star", "background"]) as jam:
        hooked = bb.predict(x, 600, cond)
    assert torch.equal(plain, hooked)
    grid = r // bb._denoiser_stride()
    cm, xm = jam.concept_maps, jam.maps
    assert cm.shape == (1, 2, grid, grid) and xm.shape == (1, cond.embeds.shape[1], grid, grid)
    torch.testing.assert_close(cm.sum(1), torch.ones(1, grid, grid))
    assert float(xm.min()) >= 0 and float(xm.sum(1).max()) <= 1 + 1e-5


@pytest.mark.slow
def test_concept_stream_equals_the_blocks_own_forward(family):
    """The concept stream's lean call (image keys / values reused, one stand-in image token) equals running the
    whole first joint block on [image, concepts] (Flux: concepts at rotary position zero), and block captures
    inside the maps see the normal forward only."""
    from diffseg_utils.joint_attention import JointAttentionMaps, concept_tokens

    name, _, bb = family
    if name not in ("sd3", "flux"):
        return
    concepts = ["star", "ring", "background"]
    r = bb.latent_resolution
    x = torch.randn(2, bb.latent_channels, r, r, generator=torch.Generator().manual_seed(1))
    cond = bb.encode_prompt(["", PROMPTS[1]])
    blk = bb.denoiser.transformer_blocks[0]
    got: dict = {}

    def keep(key, value, first=True):  # returns None: the hooks only look
        if not (first and key in got):
            got[key] = value
    hooks = [blk.register_forward_pre_hook(lambda m, a, kw: keep("kw", kw), with_kwargs=True),
             blk.attn.to_out[0].register_forward_pre_hook(lambda m, a: keep("img", a[0])),
             blk.attn.to_add_out.register_forward_pre_hook(lambda m, a: keep("con", a[0], first=False))]
    try:
        with bb.capture(["transformer_blocks.0"]) as plain:
            bb.predict(x, 600, cond)
        kw, K = dict(got["kw"]), len(concepts)
        kw["encoder_hidden_states"] = bb.denoiser.context_embedder(concept_tokens(bb, concepts))[None].expand(2, -1, -1)
        if kw.get("image_rotary_emb") is not None:
            L = cond.embeds.shape[1]
            kw["image_rotary_emb"] = tuple(torch.cat([t[:1].expand(K, -1), t[L:]]) for t in kw["image_rotary_emb"])
        blk(**kw)
    finally:
        for h in hooks:
            h.remove()
    grid = r // bb._denoiser_stride()
    want = torch.einsum("bnw,bkw->bkn", got["img"], got["con"]).softmax(1)[1:].reshape(1, K, grid, grid)
    with JointAttentionMaps(bb, concepts=concepts, layers=[0], rows="second_half") as jam:
        with bb.capture(["transformer_blocks.0"]) as cap:
            bb.predict(x, 600, cond)
    torch.testing.assert_close(jam.concept_maps, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(cap.outputs["transformer_blocks.0"], plain.outputs["transformer_blocks.0"])


@pytest.mark.slow
def test_daam_on_cross_attention_families(family):
    """DAAM's cross-attention maps on SDXL (UNet) and PixArt-Σ (DiT cross-attention to T5)."""
    from diffseg_utils import daam_segment

    name, _, bb = family
    if name not in ("sdxl", "pixart"):
        return
    res = daam_segment(bb, PROMPTS, [["star"], ["ring", "heart"]], num_steps=2, guidance_scale=4.0)
    assert res.heatmaps.shape == (2, 2, bb.resolution, bb.resolution) and res.masks.any()
    assert float(res.heatmaps.amax()) == 1.0 and float(res.heatmaps[0, 1].abs().max()) == 0.0


@pytest.mark.slow
def test_emerdiff_analog_on_joint_layers(family):
    """EmerDiff's MM-DiT analog at the real widths (SD3.5 joint attention; Flux double-stream blocks)."""
    from diffseg_utils import emerdiff_segment
    from diffseg_utils.emerdiff import joint_layers

    name, _, bb = family
    if name not in ("sd3", "flux"):
        assert joint_layers(bb) == {}
        return
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bb.denoiser.modules())
    res = emerdiff_segment(bb, torch.rand(1, 3, bb.resolution, bb.resolution), 2, num_steps=2, progress=False,
                           kmeans_restarts=2)
    grid = bb.latent_resolution // bb._denoiser_stride()
    assert res.low_res.shape == (1, grid, grid) and res.labels.shape == (1, bb.resolution, bb.resolution)
    assert res.layer in joint_layers(bb) and hooks() == 0


def test_snr_says_how_t_maps_across_families():
    """The same t is the same index, not the same noise level: DDPM abar/(1-abar) vs flow ((1-s)/s)^2."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from diffseg_utils.backbones import DDPMNoise

    ddpm = DDPMNoise(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    flow = FlowNoise(FlowMatchEulerDiscreteScheduler())
    a = float(ddpm.scheduler.alphas_cumprod[250])
    assert ddpm.snr(250) == pytest.approx(a / (1 - a)) and flow.snr(250) == pytest.approx(9.0)
    assert flow.snr(500) == pytest.approx(1.0) and flow.snr(0) == float("inf") and ddpm.snr(250) != flow.snr(250)
