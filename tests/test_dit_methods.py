"""The methods that only need blocks and noise run unchanged on a diffusion transformer (micro SD3)."""
from __future__ import annotations

import pytest
import torch

import diffseg_utils as ds
from diffseg_utils.sampling import generate


def test_blocks_are_token_grids(sd3_micro):
    blocks = sd3_micro.blocks()
    assert list(blocks) == [f"transformer_blocks.{i}" for i in range(4)]
    assert all(b.kind == "joint" and b.resolution == (8, 8) and b.channels == 16 for b in blocks.values())
    assert ds.decoder_blocks(sd3_micro) == list(blocks)


def test_fewshot_segmenter_on_transformer_features(sd3_micro):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x[:, 0] > 0.5).long()  # a learnable two-class labelling of the pixels
    from diffseg_utils.pixel_classifier import EnsembleConfig

    cfg = EnsembleConfig(num_classes=2, num_members=2, max_steps=40)
    seg = ds.FewShotSegmenter(sd3_micro, ["transformer_blocks.1", "transformer_blocks.2"], [100, 400], 2, config=cfg,
                              min_class_fraction=0).fit(x[:3], y[:3])
    res = seg.predict(x[3:])
    assert res.labels.shape == (1, 32, 32) and res.labels.dtype == torch.long


def test_generate_and_flow_noise(sd3_micro):
    img = generate(sd3_micro, ["a photo of a star"], num_steps=3, guidance_scale=3.0)
    assert img.shape == (1, 3, sd3_micro.resolution, sd3_micro.resolution) and img.abs().max() <= 1
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(sd3_micro.add_noise(z, 0, torch.randn_like(z)), z)
    torch.testing.assert_close(sd3_micro.add_noise(z, 1000.0, 2 * z), 2 * z)


def test_emerdiff_on_a_joint_layer(sd3_micro):
    """EmerDiff's MM-DiT analog: k-means on a joint layer's image queries, ±lam on its image output."""
    from diffseg_utils.emerdiff import _denoise_timesteps, _joint_modulated_runs, joint_layers

    bb = sd3_micro
    assert list(joint_layers(bb)) == [f"transformer_blocks.{i}.attn" for i in range(4)]
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bb.denoiser.modules())
    res = ds.emerdiff_segment(bb, torch.rand(2, 3, 16, 16), 3, num_steps=3, lam=5.0, progress=False)
    assert res.labels.shape == (2, 16, 16) and res.low_res.shape == (2, 8, 8) and hooks() == 0
    assert res.layer == "transformer_blocks.2.attn" and float(res.diffs.amax()) > 0
    # no unmodulated reference run on an MM-DiT (nothing to inject): the t_f pass and the 2K runs
    assert res.denoiser_evals_per_image == res.min_denoiser_evals_per_image
    # lam = 0: every run is plain denoising from z_tm
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = _denoise_timesteps(bb, 281, 3)
    masks = torch.zeros(2, 8, 8)
    masks[0, :4] = masks[1, 4:] = 1
    runs = _joint_modulated_runs(bb, z, masks, torch.tensor([1.0, -1.0]), 0.0, ts, "transformer_blocks.1.attn")
    x = z
    for i, t in enumerate(ts):
        x = bb.step(bb.predict(x, t), t, ts[i + 1] if i + 1 < len(ts) else None, x)
    torch.testing.assert_close(runs, x.expand(2, -1, -1, -1), atol=1e-5, rtol=1e-5)
    moved = _joint_modulated_runs(bb, z, masks, torch.tensor([1.0, -1.0]), 5.0, ts, "transformer_blocks.1.attn")
    assert not torch.allclose(moved[0], moved[1])
    import pytest

    with pytest.raises(ValueError, match="attention_injection"):
        ds.emerdiff_segment(bb, torch.rand(1, 3, 16, 16), 3, attention_injection=True, progress=False)


def test_grounding_on_transformer_features(sd3_micro):
    """One token grid gives one feature group; queries are the conditioning's width (SD3: the joint width)."""
    from diffseg_utils.grounding.features import feature_groups
    from diffseg_utils.grounding.module import GroundingModule, class_embeddings

    assert list(feature_groups(sd3_micro)) == [8]
    gm = GroundingModule.for_backbone(sd3_micro)
    assert class_embeddings(sd3_micro, ["star", "ring"]).shape == (2, 32)
    res = ds.ground(sd3_micro, gm, "a photo of a star", ["star", "ring"], num_steps=2)
    assert res.labels.shape == (1, sd3_micro.resolution, sd3_micro.resolution)


def test_protocol_one_scores_the_joint_maps_on_an_mmdit(sd3_micro, monkeypatch):
    """On an MM-DiT protocol I scores joint cross-attention and ConceptAttention (DAAM needs cross-attention)."""
    from diffseg_utils.grounding import labelers
    from diffseg_utils.grounding.module import GroundingConfig, GroundingModule
    from diffseg_utils.grounding.protocols import evaluate_on_generations

    names = ("star", "circle", "square")
    monkeypatch.setattr(labelers.SegmenterLabeler, "__call__", lambda self, gen, ns: (
        torch.ones(len(ns), max(map(len, ns)), *gen.images.shape[-2:], dtype=torch.bool),
        torch.ones(len(ns), max(map(len, ns)), dtype=torch.bool)))
    gm = GroundingModule.for_backbone(sd3_micro, config=GroundingConfig(d_model=16, heads=2, layers=1, ff=32))
    res = evaluate_on_generations(sd3_micro, gm, None, names, names[:2], num_images=2, num_steps=2, progress=False,
                                  template="a photo of a {}")
    assert set(res.iou) == {"grounding", "joint_cross_attention", "concept_attention"}
    assert set(res.examples) >= {"joint_cross_attention", "concept_attention"}
    # the truth is every pixel: IoU = the predicted area, which the argmax masks of two images cannot all fill
    assert all(0 <= v <= 1 for m in res.iou.values() for v in m.values() if v == v)


def test_token_study_adds_the_concept_token_on_an_mmdit(sd3_micro, monkeypatch):
    from diffseg_utils.grounding import labelers
    from diffseg_utils.grounding.diagnostics import cross_attention_tokens

    def left_half(self, gen, ns):
        truth = torch.zeros(len(ns), 1, *gen.images.shape[-2:], dtype=torch.bool)
        truth[..., : gen.images.shape[-1] // 2] = True
        return truth, torch.ones(len(ns), 1, dtype=torch.bool)
    monkeypatch.setattr(labelers.SegmenterLabeler, "__call__", left_half)
    study = cross_attention_tokens(sd3_micro, None, ("star", "circle"), ["a photo of a {}"], num_images=2, num_steps=2,
                                   progress=False)
    assert study.roles[-2:] == ("concept token", "whole image") and study.pairs == 2
    assert abs(study.iou["a photo of a {}"]["whole image"] - 0.5) < 1e-6
    r = sd3_micro.resolution
    assert study.examples["a photo of a {}"]["maps"]["concept token"].shape == (2, r, r)


def test_concept_and_word_masks_match_a_plain_reference(sd3_micro):
    import torch.nn.functional as F

    from diffseg_utils.attention_maps import word_heatmaps
    from diffseg_utils.grounding.protocols import attention_maps, attention_masks
    from diffseg_utils.text import token_span

    prompts = ["a photo of a star", "a photo of a circle and a square"]
    names = [["star"], ["circle", "square"]]
    cam = attention_maps(sd3_micro, cfg_batch=True, concepts=["star", "circle", "square", "background"])
    with cam:
        generate(sd3_micro, prompts, num_steps=2, guidance_scale=3.0)
    got = attention_masks(cam, prompts, names, 32)
    lab = F.interpolate(cam.concept_maps, size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(got["concept_attention"][1, 1], lab[1] == 2) and not got["concept_attention"][0, 1].any()
    m = cam.maps[1, token_span(sd3_micro.prompt_tokenizer, prompts[1], "square")].mean(0)
    up = F.interpolate(m[None, None], size=(32, 32), mode="bicubic", align_corners=False)[0, 0]
    ref = (up - up.min()) / (up.max() - up.min())
    torch.testing.assert_close(word_heatmaps(cam.maps, sd3_micro.prompt_tokenizer, prompts, names, 32)[1, 1], ref)
    assert torch.equal(got["joint_cross_attention"][1, 1], ref > 0.4)
    with pytest.raises(ValueError, match="not among this block's concepts"):
        cam.concept_masks([["hexagon"], ["star"]], 32)
