"""Where does a backbone's cross-attention put a prompt's tokens? A measured check of the attention baselines.

DAAM reads a word's segmentation off the cross-attention probabilities of that word's tokens.
That presumes the UNet attends from an object's pixels to the *word* naming it. A small model may
route the prompt's content through another token instead (in a causal text encoder the
end-of-text token has seen every word), and then the class word's map says little about the
object. :func:`cross_attention_tokens` measures this directly: on one-object generations it
scores, against a segmenter's masks, the DAAM mask of each token role below, under several
prompt templates (same seeds, so the same noise, for every template). On an MM-DiT the maps are the
joint cross-attention's (image queries on text keys), and one more role is scored: the class's
ConceptAttention map (its concept token, encoded on its own, never fed back).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention_maps import token_heatmaps
from ..backbones import Backbone
from ..joint_attention import has_joint_blocks
from ..text import token_span
from .features import generate_with_features
from .labelers import SegmenterLabeler
from .prompts import sample_prompt, sample_seed
from .protocols import attention_maps

__all__ = ["ROLES", "TokenStudy", "cross_attention_tokens"]

ROLES = ("class word", "start of text", "end of text", "class word, inverted", "concept token", "whole image")
"""The maps scored: a token's attention map (start-of-text, the class word, end-of-text), the class word's map
turned upside down (1 - map: high where the word is *not* attended), the class's ConceptAttention map (MM-DiTs
only: argmax over the classes and "background"), and every pixel (the floor a query-agnostic guess gets)."""


@dataclass
class TokenStudy:
    """IoU with the segmenter's masks of DAAM masks made from each token role, per prompt template."""

    templates: tuple[str, ...]
    roles: tuple[str, ...]                    # the ROLES this backbone has
    iou: dict[str, dict[str, float]]          # template -> role -> IoU (intersections / unions summed over images)
    similarity: dict[str, float]              # template -> mean Pearson r between class-word and start-token maps
    pairs: int                                # images whose prompted object the segmenter found (the ones scored)
    examples: dict = field(default_factory=dict, repr=False)  # template -> images, prompts, truth, maps per role

    def table(self) -> dict[str, dict[str, float]]:
        """role -> template -> IoU (rows to print)."""
        return {r: {t: self.iou[t][r] for t in self.templates} for r in self.roles}


@torch.no_grad()
def cross_attention_tokens(
    backbone: Backbone,
    segmenter,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    num_images: int = 32,
    seed: int = 10_000,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    threshold: float = 0.4,
    min_score: float = 0.05,
    batch_size: int = 16,
    keep_examples: int = 4,
    progress: bool = True,
) -> TokenStudy:
    """Score DAAM masks of each token role (:data:`ROLES`) on one-object generations, per template.

    Prompts ``template.format(c)`` with ``c`` drawn from ``class_names`` by sample index (the same
    classes and initial noise for every template). The segmenter's top mask for ``c`` is the truth;
    an image where it does not find ``c`` is not scored. Maps: DAAM's (summed over steps, conditional
    half, averaged over layers and heads), bicubic to the image size, min-max per map, ``> threshold``.
    Returns a :class:`TokenStudy`; ``examples[template]`` holds the first ``keep_examples`` scored images
    (``images`` (k, 3, R, R), ``truth`` (k, R, R) bool, ``maps`` role -> (k, R, R) float in [0, 1]).
    """
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty: pass at least one prompt template such as 'a photo of a {}'")
    labeler = SegmenterLabeler(segmenter, min_score=min_score)
    tok = backbone.prompt_tokenizer
    iou, sim, examples, pairs = {}, {}, {}, 0
    concepts = [*class_names, "background"]
    joint = has_joint_blocks(backbone)
    all_roles = tuple(r for r in ROLES if joint or r != "concept token")
    roles = [r for r in all_roles if r != "whole image"]
    bar = tqdm(total=len(templates) * num_images, desc="cross-attention tokens", disable=not progress)
    for tpl in templates:
        inter = dict.fromkeys(all_roles, 0.0)
        union = dict.fromkeys(all_roles, 0.0)
        rs: list[float] = []
        ex: dict = {"images": [], "prompts": [], "truth": [], "maps": {r: [] for r in roles}}
        pairs = 0
        for s in range(0, num_images, batch_size):
            idx = range(s, min(s + batch_size, num_images))
            pn = [sample_prompt(class_names, i, seed, template=tpl, two_prob=0.0) for i in idx]
            prompts, names = [p for p, _ in pn], [n for _, n in pn]
            with attention_maps(backbone, cfg_batch=guidance_scale != 1.0, concepts=concepts) as cam:  # DAAM ignores them
                gen = generate_with_features(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                                             seed=[sample_seed(seed, i) for i in idx])
            size = gen.images.shape[-1]
            truth, valid = labeler(gen, names)
            gt, ok = truth[:, 0], valid[:, 0]                                          # (n, H, W), (n,)
            maps = cam.maps.cpu()                                                      # (n, K, r, r)
            pos = {"class word": [], "start of text": [], "end of text": []}
            for p, nm in zip(prompts, names):
                pos["class word"].append(token_span(tok, p, nm[0]))
                pos["start of text"].append([0])
                pos["end of text"].append([len(tok(p, truncation=True).input_ids) - 1])
            heat = {r: token_heatmaps(maps, [[k] for k in pos[r]], size)[:, 0] for r in pos}
            heat["class word, inverted"] = 1 - heat["class word"]
            pred = {r: heat[r] > threshold for r in heat}
            if joint:  # the class's concept probability (shown), its argmax mask (scored)
                ci = [concepts.index(nm[0]) for nm in names]
                heat["concept token"] = F.interpolate(cam.concept_maps.cpu(), size=(size, size), mode="bilinear",
                                                      align_corners=False)[torch.arange(len(ci)), ci]
                pred["concept token"] = cam.concept_masks([nm[:1] for nm in names], size)[:, 0].cpu()
            pred["whole image"] = torch.ones_like(gt)
            for r in all_roles:
                inter[r] += float((pred[r] & gt)[ok].sum())
                union[r] += float((pred[r] | gt)[ok].sum())
            for i in range(len(prompts)):
                a, b = heat["class word"][i].flatten(), heat["start of text"][i].flatten()
                rs.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
            pairs += int(ok.sum())
            for i in torch.nonzero(ok).flatten().tolist()[:max(0, keep_examples - len(ex["images"]))]:
                ex["images"].append(gen.images[i].cpu())                             # scored images only
                ex["prompts"].append(prompts[i])
                ex["truth"].append(gt[i])
                for r in roles:
                    ex["maps"][r].append(heat[r][i])
            bar.update(len(prompts))
        iou[tpl] = {r: inter[r] / union[r] if union[r] else float("nan") for r in all_roles}
        sim[tpl] = float(np.nanmean(rs))
        if ex["images"]:
            examples[tpl] = {"images": torch.stack(ex["images"]), "prompts": ex["prompts"],
                             "truth": torch.stack(ex["truth"]),
                             "maps": {r: torch.stack(v) for r, v in ex["maps"].items()}}
    bar.close()
    return TokenStudy(templates, all_roles, iou, sim, pairs, examples)
