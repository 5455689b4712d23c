"""Grounding: features captured while generating, the grounded labeler, batched training, both protocols."""
import pytest
import torch

from diffseg_utils.grounding.data import GroundingShards, synthesize
from diffseg_utils.grounding.features import feature_groups, generate_with_features
from diffseg_utils.grounding.module import GroundingConfig, GroundingModule, class_embeddings
from diffseg_utils.grounding.protocols import (GroundingLabeler, evaluate_on_generations, evaluate_segmenter,
                                                fit_segmenter, harmonic)
from diffseg_utils.grounding.train import train_grounding
from diffseg_utils.hooks import CaptureOutputs
from diffseg_utils.sampling import generate
from diffseg_utils.toy.oracle import SegmenterOutput

SMALL = GroundingConfig(d_model=32, heads=2, layers=1, ff=64, patch=1, lr=1e-3)
NAMES = ("star", "ring", "heart")


@pytest.mark.parametrize("step", [0, 1, -1])
def test_features_from_the_generation_pass_equal_a_separate_unet_call(sd_tiny, step):
    bb, prompts, g = sd_tiny, ["a photo of a star", "a photo of a ring and a heart"], 4.0
    xs = []
    generate(bb, prompts, num_steps=3, guidance=g, seed=[5, 6], callback=lambda i, t, x, e: xs.append((t, x)))
    x_in = xs[step - 1][1] if step % 3 else torch.stack(
        [torch.randn(bb.latent_channels, bb.latent_resolution, bb.latent_resolution,
                     generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    t = xs[step][0]
    cond = torch.cat([bb.empty_prompt(2), bb.encode_prompt(prompts)])
    names = [n for ns in feature_groups(bb).values() for n in ns]
    with CaptureOutputs(bb.unet, names) as cap:
        bb.unet_forward(torch.cat([x_in, x_in]), t, cond)
    gen = generate_with_features(bb, prompts, num_steps=3, guidance=g, seed=[5, 6], feature_step=step,
                                 dtype=torch.float32)
    assert gen.timestep == t
    for r, ns in feature_groups(bb).items():
        ref = torch.cat([torch.cat(cap.outputs[n].chunk(2), 1) for n in ns], 1)
        torch.testing.assert_close(gen.features[r], ref)
    with pytest.raises(ValueError, match="feature_step"):
        generate_with_features(bb, prompts, num_steps=3, feature_step=3)


class FakeSegmenter:
    """Finds 'star' in the left half and 'ring' in the right half of every image; never 'heart'."""

    class_names = NAMES

    def __call__(self, images):
        n, _, h, w = images.shape
        masks = torch.zeros(n, 3, h, w, dtype=torch.bool)
        masks[:, 0, :, : w // 2] = True
        masks[:, 1, :, w // 2:] = True
        return SegmenterOutput(masks, torch.tensor([[0.9, 0.8, 0.0]]).repeat(n, 1), NAMES)


def test_grounding_labeler_gives_disjoint_masks_for_prompted_classes(sd_tiny):
    gm = GroundingModule.for_backbone(sd_tiny, config=SMALL)
    lab = GroundingLabeler(sd_tiny, gm, NAMES)
    gen = generate_with_features(sd_tiny, ["a photograph of a star and a ring", "a photograph of a heart"],
                                 num_steps=2)
    masks, valid = lab(gen, [["star", "ring"], ["heart"]])
    assert masks.shape == (2, 2, sd_tiny.resolution, sd_tiny.resolution)
    assert valid.tolist() == [[True, True], [True, False]]
    assert not (masks[:, 0] & masks[:, 1]).any() and not masks[1, 1].any()
    with pytest.raises(ValueError, match="no text query"):
        lab(gen, [["zebra"], ["heart"]])


def test_training_learns_the_labels_and_protocols_run(sd_tiny, tmp_path):
    """On a fake segmenter's half-image labels the module's loss falls, and protocol I scores it.

    'heart' is never found: it gets no loss term and is not scored (nan), never an empty target.
    """
    from diffseg_utils.grounding.data import SegmenterLabeler

    torch.manual_seed(0)
    synthesize(sd_tiny, SegmenterLabeler(FakeSegmenter()), tmp_path / "s", num_samples=8, class_names=NAMES,
               shard_size=8, num_steps=2, guidance=4.0, progress=False)
    shards = GroundingShards(tmp_path / "s")
    assert not shards.valid[shards.class_ids == 2].any()
    gm = GroundingModule.for_backbone(sd_tiny, guidance=True, config=SMALL)
    q = class_embeddings(sd_tiny, shards.class_names, gm.config.template)
    hist = train_grounding(gm, shards, q, steps=60, batch_size=8, progress=False, log_every=10)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    res = evaluate_on_generations(sd_tiny, gm, FakeSegmenter(), NAMES, ("star", "ring"), num_images=8, seed=0,
                                  num_steps=2, guidance=4.0, batch_size=8, progress=False, keep_examples=2)
    assert res.pairs["heart"] == 0 and res.pairs["star"] > 0
    tab = res.table()
    assert set(tab) == {"grounding", "daam"} and tab["grounding"]["seen"] > 0.6
    assert len(res.examples["images"]) == 2
    with pytest.raises(ValueError, match="class id"):
        train_grounding(gm, shards, q[:1], steps=1, progress=False)


def test_fit_and_evaluate_segmenter_and_errors():
    from diffseg_utils.grounding.protocols import ground_truth_seen_dataset
    from diffseg_utils.toy.world import CATEGORIES, SEEN_CATEGORIES

    x, y = ground_truth_seen_dataset(8, [1, 2])
    assert set(torch.unique(y).tolist()) <= {0, 1, 2}
    net = fit_segmenter(x, y, 11, steps=3, width=4, progress=False)
    out = evaluate_segmenter(net, CATEGORIES, SEEN_CATEGORIES, num_images=4, chunk=4)
    assert {"seen", "unseen", "harmonic"} <= set(out)
    with pytest.raises(ValueError, match="labels must be in 0..10"):
        fit_segmenter(x, y + 20, 11, steps=1, progress=False)
    with pytest.raises(ValueError, match="do not match"):
        fit_segmenter(x[:2], y, 11, steps=1, progress=False)
    assert harmonic(0.5, 0.5) == 0.5 and harmonic(0.4, 0.0) == 0.0
