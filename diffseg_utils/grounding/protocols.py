"""Grounded Diffusion's two evaluation protocols on the toy world.

* Protocol I (:func:`evaluate_on_generations`): generate images from prompts over *all*
  categories, take the oracle segmenter's masks as ground truth, and score the grounding
  module and the cross-attention baseline (DAAM) on the very same generations (one pass:
  features, attention maps and images come from the same denoising run). mIoU per category,
  averaged over seen and over unseen categories.
* Protocol II (:class:`GroundingLabeler` with :func:`~diffseg_utils.grounding.data.synthesize`, then
  :func:`fit_segmenter` + :func:`evaluate_segmenter`): the grounded generator writes a segmentation
  data set for all categories (``python -m diffseg_utils.grounding.synth --labeler grounding`` under
  ``accelerate launch`` for large runs); a small segmenter
  trained on it is scored on procedural ground-truth images (seen, unseen, harmonic mIoU) and
  compared with the same segmenter trained on ground-truth images of the seen categories only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention_maps import CrossAttentionMaps
from ..backbones import Backbone
from ..metrics import iou_per_class
from .data import MAX_CLASSES, SegmenterLabeler, sample_prompt, sample_seed
from .features import generate_with_features
from .module import GroundingModule, class_embeddings


def harmonic(a: float, b: float) -> float:
    """Harmonic mean of seen and unseen mIoU (0 when either is 0)."""
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


@dataclass
class ProtocolOneResult:
    """Per-category IoU of each method on generated images (oracle masks as ground truth)."""

    class_names: tuple[str, ...]
    seen: tuple[str, ...]
    iou: dict[str, dict[str, float]]          # method -> class -> IoU (nan: never found by the oracle)
    pairs: dict[str, int]                     # class -> number of (image, class) pairs scored
    examples: dict = field(default_factory=dict, repr=False)  # images, prompts, names; per-word masks per method

    def miou(self, method: str, split: str) -> float:
        names = [c for c in self.class_names if (c in self.seen) == (split == "seen")]
        vals = [self.iou[method][c] for c in names if not np.isnan(self.iou[method][c])]
        return float(np.mean(vals)) if vals else float("nan")

    def table(self) -> dict[str, dict[str, float]]:
        """method -> {seen, unseen, harmonic} mIoU."""
        out = {}
        for m in self.iou:
            s, u = self.miou(m, "seen"), self.miou(m, "unseen")
            out[m] = {"seen": s, "unseen": u, "harmonic": harmonic(s, u)}
        return out


@torch.no_grad()
def evaluate_on_generations(
    backbone: Backbone,
    module: GroundingModule,
    segmenter,
    class_names: Sequence[str],
    seen: Sequence[str],
    *,
    num_images: int = 64,
    seed: int = 10_000,
    num_steps: int = 20,
    guidance: float = 5.0,
    feature_step: int = -1,
    batch_size: int = 16,
    daam_threshold: float = 0.4,
    min_score: float = 0.05,
    keep_examples: int = 8,
    progress: bool = True,
) -> ProtocolOneResult:
    """Protocol I: grounding module vs cross-attention maps on generations, oracle masks as ground truth.

    Prompts "a photograph of a {c1}[ and a {c2}]" over all ``class_names`` (seed ``seed``,
    disjoint from the training seeds by default). A prompted class the oracle does not find is
    not scored (we cannot know where it should be).
    """
    class_names = tuple(class_names)
    template = module.config.template
    queries = class_embeddings(backbone, class_names, template)            # (C, D)
    oracle = SegmenterLabeler(segmenter, min_score=min_score)              # top mask per prompted class
    inter = {m: np.zeros(len(class_names)) for m in ("grounding", "daam")}
    union = {m: np.zeros(len(class_names)) for m in ("grounding", "daam")}
    count = np.zeros(len(class_names), dtype=int)
    ex: dict[str, list] = {"images": [], "prompts": [], "names": [], "oracle": [], "grounding": [], "daam": []}
    for s in tqdm(range(0, num_images, batch_size), desc="protocol I", disable=not progress):
        idx = range(s, min(s + batch_size, num_images))
        pn = [sample_prompt(class_names, i, seed, template=template) for i in idx]
        prompts, names = [p for p, _ in pn], [n for _, n in pn]
        with CrossAttentionMaps(backbone, guidance=guidance != 1.0) as cam:
            gen = generate_with_features(backbone, prompts, num_steps=num_steps, guidance=guidance,
                                         seed=[sample_seed(seed, i) for i in idx], feature_step=feature_step)
        size = gen.images.shape[-1]
        truth, valid = oracle(gen, names)                                                 # (n, M, H, W), (n, M)
        daam = cam.masks(prompts, names, threshold=daam_threshold, image_size=size)      # (n, W, H, W)
        width = max(len(n) for n in names)
        cid = torch.tensor([[class_names.index(c) for c in n] + [0] * (width - len(n)) for n in names])
        logits = module(gen.features, queries[cid], out_size=size)                       # (n, W, H, W)
        pred = {"grounding": logits > 0, "daam": daam}
        for j, n in enumerate(names):
            for w, c in enumerate(n):
                if not valid[j, w]:  # the oracle did not find it: not scored
                    continue
                gt = truth[j, w].to(logits.device)
                ci = class_names.index(c)
                count[ci] += 1
                for m in inter:
                    p = pred[m][j, w].to(gt.device)
                    inter[m][ci] += float((p & gt).sum())
                    union[m][ci] += float((p | gt).sum())
        if len(ex["images"]) < keep_examples:
            ex["images"].extend(gen.images.cpu())
            ex["prompts"].extend(prompts)
            ex["names"].extend(names)
            ex["grounding"].extend(pred["grounding"].cpu())
            ex["daam"].extend(daam.cpu())
            ex["oracle"].extend(truth.cpu())
    ex = {k: v[:keep_examples] for k, v in ex.items()}
    iou = {m: {c: (inter[m][i] / union[m][i] if count[i] else float("nan")) for i, c in enumerate(class_names)}
           for m in inter}
    return ProtocolOneResult(class_names, tuple(seen), iou, {c: int(count[i]) for i, c in enumerate(class_names)}, ex)


class GroundingLabeler:
    """Labels generated images with the grounding module (the data-set factory of protocol II).

    Same signature as :class:`~diffseg_utils.grounding.data.SegmenterLabeler`:
    ``labeler(batch, names) -> (masks (N, M, H, W) bool, valid (N, M) bool)``. Where masks of two
    prompted classes overlap, the pixel goes to the class with the larger logit.
    """

    def __init__(self, backbone: Backbone, module: GroundingModule, class_names: Sequence[str],
                 max_classes: int = MAX_CLASSES, name: str = "grounding"):
        self.module = module.eval()
        self.class_names = tuple(class_names)
        self.max_classes = max_classes
        self.queries = class_embeddings(backbone, self.class_names, module.config.template)
        self.config = {"name": name, "embed_dim": module.embed_dim, "template": module.config.template}

    @torch.no_grad()
    def __call__(self, batch, names: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.max_classes
        unknown = {c for n in names for c in n} - set(self.class_names)
        if unknown:
            raise ValueError(f"classes {sorted(unknown)} have no text query; known: {list(self.class_names)}")
        cid = torch.tensor([[self.class_names.index(c) for c in n] + [0] * (m - len(n)) for n in names])
        valid = torch.tensor([[w < len(n) for w in range(m)] for n in names])
        logits = self.module(batch.features, self.queries[cid], out_size=batch.images.shape[-1])
        logits = logits.masked_fill(~valid.to(logits.device)[..., None, None], float("-inf"))
        best = logits.argmax(1, keepdim=True)                                  # (N, 1, H, W)
        masks = (logits > 0) & (torch.arange(m, device=logits.device)[None, :, None, None] == best)
        return masks.cpu(), valid


# ----------------------------------------------------------------- protocol II: a segmenter trained on synthetic data
def fit_segmenter(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    width: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> torch.nn.Module:
    """Train a small U-Net segmenter (the oracle's architecture, narrower) on (N, 3, H, W) uint8 images and
    (N, H, W) labels in 0..num_classes-1; random flips; cosine learning rate. Returns it in eval mode."""
    from ..toy.oracle import OracleNet

    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    torch.manual_seed(seed)
    net = OracleNet(width, num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in tqdm(range(steps), desc="segmenter", disable=not progress):
        for gr in opt.param_groups:
            gr["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx].float() / 127.5 - 1
        y = labels[idx].long()
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def evaluate_segmenter(net: torch.nn.Module, class_names: Sequence[str], seen: Sequence[str], *, split: str = "grounding_test",
                       num_images: int = 200, chunk: int = 100) -> dict[str, float]:
    """Seen / unseen / harmonic mIoU (foreground classes; background excluded) on procedural ground-truth images."""
    from ..toy.oracle import procedural_confusion
    from ..toy.world import CATEGORIES

    # our class order -> world ids (identical for the toy, but keep the mapping explicit)
    to_world = torch.tensor([0] + [CATEGORIES.index(c) + 1 for c in class_names])
    cm = procedural_confusion(lambda x: to_world[net(x).argmax(1)], num_images, split, chunk)
    iou = iou_per_class(cm).numpy()[to_world[1:].numpy()]
    s = float(np.nanmean([iou[i] for i, c in enumerate(class_names) if c in seen]))
    u = float(np.nanmean([iou[i] for i, c in enumerate(class_names) if c not in seen]))
    return {"seen": s, "unseen": u, "harmonic": harmonic(s, u), **{c: float(iou[i]) for i, c in enumerate(class_names)}}


def ground_truth_seen_dataset(num_images: int, seen_ids: Sequence[int], split: str = "grounding_gt") -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural images drawing only seen categories (ids 1..10), with exact labels: protocol II's reference."""
    from ..toy.world import render

    b = render(split, 0, num_images, categories=tuple(seen_ids))
    return torch.from_numpy(b.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(b.labels).long()
