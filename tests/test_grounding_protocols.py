"""Grounding: features captured while generating, the grounded labeler, batched training, both protocols."""
import pytest
import torch

from diffseg_utils.backbones import Conditioning
from diffseg_utils.grounding.features import feature_groups, generate_with_features
from diffseg_utils.grounding.labelers import GroundingLabeler, SegmenterLabeler
from diffseg_utils.grounding.module import GroundingConfig, GroundingModule, class_embeddings
from diffseg_utils.grounding.protocols import evaluate_on_generations, evaluate_segmenter, fit_segmenter, harmonic
from diffseg_utils.grounding.segmenter import SegmenterOutput
from diffseg_utils.grounding.shards import GroundingShards, synthesize
from diffseg_utils.grounding.train import train_grounding
from diffseg_utils.hooks import CaptureOutputs
from diffseg_utils.sampling import generate

SMALL = GroundingConfig(d_model=32, heads=2, layers=1, ff=64, patch=1, lr=1e-3)
NAMES = ("star", "ring", "heart")


@pytest.mark.parametrize("step", [0, 1, -1])
def test_features_from_the_generation_pass_equal_a_separate_unet_call(sd_tiny, step):
    bb, prompts, g = sd_tiny, ["a photo of a star", "a photo of a ring and a heart"], 4.0
    xs = []
    generate(bb, prompts, num_steps=3, guidance_scale=g, seed=[5, 6], callback=lambda i, t, x, e: xs.append((t, x)))
    x_in = xs[step - 1][1] if step % 3 else torch.stack(
        [torch.randn(bb.latent_channels, bb.latent_resolution, bb.latent_resolution,
                     generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    t = xs[step][0]
    cond = Conditioning.cat([bb.empty_prompt(2), bb.encode_prompt(prompts)])
    names = [n for ns in feature_groups(bb).values() for n in ns]
    with CaptureOutputs(bb.denoiser, names) as cap:
        bb.predict(torch.cat([x_in, x_in]), t, cond)
    gen = generate_with_features(bb, prompts, num_steps=3, guidance_scale=g, seed=[5, 6], feature_step=step,
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
    The host reads the loss only when it logs (no per-step sync): 60 steps, log_every=10 -> 6 reads.
    """
    torch.manual_seed(0)
    synthesize(sd_tiny, SegmenterLabeler(FakeSegmenter()), tmp_path / "s", num_samples=8, class_names=NAMES,
               shard_size=8, num_steps=2, guidance_scale=4.0, progress=False)
    shards = GroundingShards(tmp_path / "s")
    assert not shards.valid[shards.class_ids == 2].any()
    gm = GroundingModule.for_backbone(sd_tiny, cfg_batch=True, config=SMALL)
    q = class_embeddings(sd_tiny, shards.class_names, gm.config.template)
    import inspect

    reads = []
    item = torch.Tensor.item

    def counting_item(self):  # host reads made by our code (the optimizer's CPU step counters are not ours)
        if "grounding" in inspect.currentframe().f_back.f_code.co_filename:
            reads.append(1)
        return item(self)

    torch.Tensor.item = counting_item
    try:
        hist = train_grounding(gm, shards, q, steps=60, batch_size=8, progress=False, log_every=10)
    finally:
        torch.Tensor.item = item
    assert len(reads) == len(hist) == 6
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    res = evaluate_on_generations(sd_tiny, gm, FakeSegmenter(), NAMES, ("star", "ring"), num_images=8, seed=0,
                                  num_steps=2, guidance_scale=4.0, batch_size=8, progress=False, keep_examples=2)
    assert res.pairs["heart"] == 0 and res.pairs["star"] > 0
    tab = res.table()
    assert set(tab) == {"grounding", "daam"} and tab["grounding"]["seen"] > 0.6
    assert len(res.examples["images"]) == 2
    with pytest.raises(ValueError, match="class id"):
        train_grounding(gm, shards, q[:1], steps=1, progress=False)


class HalfImageModule:
    """A grounding 'module' that marks the left half of every image for every query (a known answer)."""

    config = GroundingConfig()  # template None: the backbone's

    def __call__(self, features, queries, out_size):
        n, q = queries.shape[:2]
        logits = torch.full((n, q, out_size, out_size), -5.0)
        logits[..., : out_size // 2] = 5.0
        return logits


def test_protocol_one_known_answer(sd_tiny):
    # ground truth (FakeSegmenter): star = left half, ring = right half, heart never found
    res = evaluate_on_generations(sd_tiny, HalfImageModule(), FakeSegmenter(), NAMES, ("star",), num_images=6,
                                  seed=1, num_steps=2, guidance_scale=4.0, batch_size=3, progress=False)
    assert res.iou["grounding"]["star"] == 1.0 and res.iou["grounding"]["ring"] == 0.0
    assert res.miou("grounding", "seen") == 1.0 and res.miou("grounding", "unseen") == 0.0  # heart: nan, skipped
    assert res.pairs["heart"] == 0 and res.pairs["star"] + res.pairs["ring"] > 0
    assert res.table()["grounding"] == {"seen": 1.0, "unseen": 0.0, "harmonic": 0.0}
    # every star pair scores 1 and every ring pair 0: the bootstrap cannot move the means
    assert res.interval("grounding", "seen") == (1.0, 1.0) and res.interval("grounding", "unseen") == (0.0, 0.0)
    assert len(res.pair_class) == res.pairs["star"] + res.pairs["ring"]
    with pytest.raises(ValueError, match="'seen' or 'unseen'"):
        res.interval("grounding", "all")


def test_protocol_one_interval_resamples_pairs_within_classes():
    """A plain bootstrap: pairs resampled within each class, class IoU = summed intersections / unions."""
    import numpy as np

    from diffseg_utils.grounding.protocols import ProtocolOneResult

    counts = np.array([[1, 2], [3, 3], [0, 4], [2, 2]], float)
    res = ProtocolOneResult(("a", "b"), ("a", "b"), {"m": {"a": 4 / 5, "b": 2 / 6}}, {"a": 2, "b": 2},
                            pair_class=np.array([0, 0, 1, 1]), pair_counts={"m": counts})
    lo, hi = res.interval("m", "seen", n_boot=500, seed=3)
    rng = np.random.default_rng(3)
    boot = np.zeros(500)
    for c in (0, 1):
        rows = counts[[i for i in range(4) if [0, 0, 1, 1][i] == c]]
        d = rows[rng.integers(0, 2, size=(500, 2))].sum(1)
        boot += d[:, 0] / d[:, 1]
    assert (lo, hi) == tuple(np.percentile(boot / 2, [2.5, 97.5])) and lo <= res.miou("m", "seen") <= hi


def test_single_class_protocol_equals_a_plain_computation(sd3_micro):
    """ConceptAttention's single-class masks = concept_attention with [class, background] and the class prompt;
    fg / bg IoU and accuracy per image as plain arithmetic; images of several objects are refused."""
    import numpy as np

    from diffseg_utils.grounding.single_class import evaluate_single_class
    from diffseg_utils.joint_attention import concept_attention

    r = sd3_micro.resolution
    g = torch.Generator().manual_seed(5)
    imgs = (torch.rand(3, 3, r, r, generator=g) * 255).to(torch.uint8)
    labels = torch.zeros(3, r, r, dtype=torch.long)
    labels[0, 2:9, 2:9], labels[1, 5:, 5:], labels[2, :6, 3:] = 1, 2, 1
    labels[2, 0, 0] = 255
    res = evaluate_single_class(sd3_micro, imgs, labels, ["star", "ring"], t=400, seed=2, template="a photo of a {}")
    assert set(res.scores) == {"joint_cross_attention", "concept_attention"} and res.classes == ("star", "ring", "star")
    for i, name in enumerate(res.classes):
        lab = concept_attention(sd3_micro, imgs[i:i + 1], [name, "background"], timesteps=(400,), seed=2,
                                prompt=f"a photo of a {name}").labels[0].numpy()
        m, gt, ok = lab == 0, labels[i].numpy() == ["star", "ring"].index(name) + 1, labels[i].numpy() != 255
        want = [(m & gt & ok).sum() / max(((m | gt) & ok).sum(), 1), (~m & ~gt & ok).sum() / max(((~m | ~gt) & ok).sum(), 1),
                ((m == gt) & ok).sum() / ok.sum()]
        assert np.allclose(res.scores["concept_attention"][i], want, atol=1e-6)
    t = res.table()["concept_attention"]
    assert abs(t["miou"] - res.per_image_miou("concept_attention").mean()) < 1e-12
    fl = res.table(floors=True)
    gt = [(labels[i] == k).float().mean().item() for i, k in enumerate((1, 2, 1))]
    assert fl["no object"]["fg_iou"] == 0 and abs(fl["whole image"]["accuracy"] - np.mean(gt)) < 0.01
    two = labels.clone()
    two[0, 0, 1] = 2
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_single_class(sd3_micro, imgs, two, ["star", "ring"])
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate_single_class(sd3_micro, imgs, labels, ["star", "ring"], maps=False)


class LabelNet(torch.nn.Module):
    """A 'segmenter' that returns given label maps as logits (a known answer): the truth, or all background."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.logits = torch.nn.functional.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float() * 10
        self.i = 0

    def forward(self, x):
        out = self.logits[self.i:self.i + x.shape[0]]
        self.i += x.shape[0]
        return out + self.w


def test_fit_and_evaluate_segmenter_known_answers_and_errors():
    from diffseg_utils.toy.grounding_defaults import ground_truth_seen_dataset, protocol_two_test_set, segmenter_net
    from diffseg_utils.toy.world import CATEGORIES, SEEN_CATEGORIES

    x, y = protocol_two_test_set(8)
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 64, 64) and int(y.max()) <= len(CATEGORIES)
    k = len(CATEGORIES) + 1
    perfect = evaluate_segmenter(LabelNet(y, k), x, y, CATEGORIES, SEEN_CATEGORIES, chunk=3)
    assert perfect["seen"] == 1.0 and perfect["unseen"] == 1.0 and perfect["harmonic"] == 1.0
    empty = evaluate_segmenter(LabelNet(torch.zeros_like(y), k), x, y, CATEGORIES, SEEN_CATEGORIES, chunk=3)
    assert empty["seen"] == 0.0 and empty["unseen"] == 0.0 and empty["harmonic"] == 0.0
    # one class wrong everywhere it occurs: its IoU is 0, the others stay 1
    c = int(y[y > 0][0])
    swapped = torch.where(y == c, torch.zeros_like(y), y)
    one_off = evaluate_segmenter(LabelNet(swapped, k), x, y, CATEGORIES, SEEN_CATEGORIES)
    others = [one_off[n] for n in CATEGORIES if n != CATEGORIES[c - 1] and one_off[n] == one_off[n]]  # not nan
    assert one_off[CATEGORIES[c - 1]] == 0.0 and others and all(v == 1.0 for v in others)

    xs, ys = ground_truth_seen_dataset(8, SEEN_CATEGORIES[:2])
    assert set(torch.unique(ys).tolist()) <= {0, 1, 2}
    net = fit_segmenter(xs, ys, k, net=segmenter_net(k, width=4), steps=3, progress=False, device="cpu")
    assert not net.training and next(net.parameters()).device.type == "cpu"
    out = evaluate_segmenter(net, x, y, CATEGORIES, SEEN_CATEGORIES, chunk=4)
    assert {"seen", "unseen", "harmonic"} <= set(out)
    with pytest.raises(ValueError, match="labels must be in 0..10"):
        fit_segmenter(xs, ys + 20, 11, net=segmenter_net(k, width=4), steps=1, progress=False)
    with pytest.raises(ValueError, match="do not match"):
        fit_segmenter(xs[:2], ys, 11, net=segmenter_net(k, width=4), steps=1, progress=False)
    with pytest.raises(TypeError, match="uint8"):
        fit_segmenter(xs.float(), ys, 11, net=segmenter_net(k, width=4), steps=1, progress=False)
    assert harmonic(0.5, 0.5) == 0.5 and harmonic(0.4, 0.0) == 0.0


def test_segmenter_augmentation_moves_images_and_labels_together():
    from diffseg_utils.grounding.protocols import _translate

    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    y = torch.arange(16).reshape(1, 4, 4)
    for dy, dx in [(1, 0), (0, -2), (-1, 1)]:
        xt, yt = _translate(x, y, dy, dx, 255)
        keep = yt != 255
        # a kept label still sits on its own pixel value: image and label moved by the same (dy, dx)
        assert torch.equal(xt[:, 0][keep], yt[keep].float())
        assert int(keep.sum()) == (4 - abs(dy)) * (4 - abs(dx))
    assert _translate(x, y, 0, 0, 255)[1] is y


def test_fit_segmenter_checks_its_augmentation_and_ignored_labels():
    from diffseg_utils.toy.grounding_defaults import ground_truth_seen_dataset, segmenter_net
    from diffseg_utils.toy.world import SEEN_CATEGORIES

    xs, ys = ground_truth_seen_dataset(4, SEEN_CATEGORIES[:2])
    k = 11
    net = fit_segmenter(xs, torch.where(ys > 0, 255, ys), k, net=segmenter_net(k, width=4), steps=2, shift=4,
                        permute_channels=True, progress=False)  # ignored pixels (255) are allowed, not trained on
    assert not net.training
    with pytest.raises(ValueError, match="nothing to train on"):
        fit_segmenter(xs, torch.full_like(ys, 255), k, net=segmenter_net(k, width=4), steps=1, progress=False)
    with pytest.raises(ValueError, match="shift"):
        fit_segmenter(xs, ys, k, net=segmenter_net(k, width=4), steps=1, shift=64, progress=False)


def test_protocol_two_curve_trains_every_source_and_round_trips(tmp_path):
    """The curve on the shipped toy SD at toy size: every source x size is trained and scored; the seen-only
    labeler leaves unseen classes out of its labels; kept segmenters load back to the same scores."""
    import json

    from diffseg_utils import load_backbone
    from diffseg_utils.grounding.module import GroundingModule
    from diffseg_utils.grounding.protocol_two import SOURCES, load_segmenters, protocol_two_curve, save_segmenter
    from diffseg_utils.toy.grounding_defaults import TOY, protocol_two_test_set
    from diffseg_utils.toy.world import CATEGORIES, SEEN_CATEGORIES

    bb = load_backbone("toy", device="cpu")
    gm = GroundingModule.load(TOY.checkpoint, device=bb)
    settings = dict(steps=2, batch_size=4)
    results, nets = protocol_two_curve(bb, TOY, gm, sizes=[6, 3], work=tmp_path / "work", n_test=6,
                                       settings=settings, num_steps=2, progress=False)
    assert set(results) == set(SOURCES) and sorted(results["grounded"]) == sorted(results["truth_seen"]) == [3, 6]
    assert sorted(results["segmenter_seen"]) == [6]   # the ablation: at the largest size only
    assert all({"seen", "unseen", "harmonic", "seconds"} <= set(r) for v in results.values() for r in v.values())
    seen_ids = {CATEGORIES.index(c) + 1 for c in SEEN_CATEGORIES}
    from diffseg_utils.grounding.shards import GroundingShards

    (seg_dir,) = (tmp_path / "work").glob("segmenter_seen_*")
    assert set(GroundingShards(seg_dir, features=False).index_masks().unique().tolist()) <= seen_ids | {0}
    out = tmp_path / "out"
    out.mkdir()
    save_segmenter(nets[("grounded", 6)], out / "grounded_6.safetensors")
    (out / "results.json").write_text(json.dumps({"results": results, "kept": [["grounded", 6]]}))
    loaded_results, loaded = load_segmenters(out, TOY)
    x, y = protocol_two_test_set(6, CATEGORIES)
    assert loaded_results["grounded"][6]["seen"] == results["grounded"][6]["seen"]
    assert evaluate_segmenter(loaded[("grounded", 6)], x, y, CATEGORIES, SEEN_CATEGORIES)["seen"] == \
        results["grounded"][6]["seen"]
    with pytest.raises(FileNotFoundError, match="protocol_two"):
        load_segmenters(tmp_path / "nothing", TOY)
    with pytest.raises(ValueError, match="sizes"):
        protocol_two_curve(bb, TOY, gm, sizes=[], work=tmp_path / "w2", settings=settings, progress=False)
