"""The toy world's grounding defaults: class splits, the oracle labeler, the module config, protocol II.

Two :class:`~diffseg_utils.grounding.defaults.GroundingDefaults`: :data:`TOY` (the toy SD) and
:data:`TOY_SD3` (the toy MM-DiT), the same world with each backbone's own trained grounding module.
The general code never imports this module; the registry entries name them
(``diffseg_utils.toy.grounding_defaults:TOY``), and the CLIs take them from ``--defaults``.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..grounding.defaults import GroundingDefaults
from ..registry import DATA_DIR, TOY_SD3_DIR, TOY_SD_DIR
from .world import CATEGORIES, SEEN_CATEGORIES, UNSEEN_CATEGORIES, render

CLASS_SETS: dict[str, tuple[str, ...]] = {"seen": SEEN_CATEGORIES, "unseen": UNSEEN_CATEGORIES, "all": CATEGORIES}
ORACLE_DIR = DATA_DIR / "oracle"
CHECKPOINT = DATA_DIR / "grounding" / "grounding.pt"
CHECKPOINT_SD3 = DATA_DIR / "grounding" / "toy-sd3" / "grounding.pt"

SEGMENTER_SETTINGS = dict(steps=1500, batch_size=16, lr=2e-3, shift=8, permute_channels=True)
"""Protocol II's segmenter training (``fit_segmenter`` keywords): 1500 AdamW steps of 16 images, shifts of up to 8 px
and random channel order (a shape's colour is random in this world, so the order is label-preserving). Trained on 250
labelled seen-class images it reaches 0.643 seen mIoU on 500 test images (2 threads; 0.649 with 1);
data/grounding/README.md has the curve."""


def oracle_segmenter(device: torch.device | str = "cpu", path: str | Path = ORACLE_DIR):
    """The toy world's oracle segmenter (our Mask R-CNN), named "oracle" in manifests."""
    from .oracle import OracleSegmenter

    path = Path(path)
    seg = OracleSegmenter.load(path.parent if path.is_file() else path, device=device)
    seg.name = "oracle"
    return seg


def oracle_labeler(args: argparse.Namespace, backbone):
    """--labeler oracle: the oracle's top-scoring mask per prompted class."""
    from ..grounding.labelers import SegmenterLabeler

    seg = oracle_segmenter(backbone.device, getattr(args, "oracle", None) or ORACLE_DIR)
    return SegmenterLabeler(seg, min_score=getattr(args, "min_score", 0.05), name="oracle")


LABELERS = {"oracle": oracle_labeler}


def segmenter(device: torch.device | str = "cpu"):
    """The segmenter that labels generated images and gives protocol I its ground truth (the paper's
    Mask R-CNN): the toy world's oracle."""
    return oracle_segmenter(device)


def module_config():
    """Our grounding-module configuration for the toy model: the paper's architecture, narrower (width
    128) so the module trains in minutes on a CPU and ships in a few MB; Adam 1e-4 instead of 1e-5
    because we train for thousands of batched steps, not the paper's tens of thousands of single images."""
    from ..grounding.module import GroundingConfig

    return GroundingConfig(d_model=128, heads=4, layers=3, ff=512, lr=1e-4)


def provenance(backbone) -> dict:
    """What a module trained on the shipped toy SD records about it: the UNet's training step."""
    state = TOY_SD_DIR / "training_state.json"
    return {"toy_sd_unet_step": json.loads(state.read_text())["unet_step"]} if state.exists() else {}


def provenance_sd3(backbone) -> dict:
    """What a module trained on the shipped toy MM-DiT records about it: the transformer's training step."""
    state = TOY_SD3_DIR / "training_state.json"
    return {"toy_sd3_step": json.loads(state.read_text())["step"]} if state.exists() else {}


# ------------------------------------------------------------------------ protocol II
def segmenter_net(num_classes: int, width: int = 16, seed: int = 0) -> torch.nn.Module:
    """Protocol II's segmenter: the oracle's U-Net, narrower; its initial weights depend only on ``seed``."""
    from .oracle import OracleNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OracleNet(width, num_classes)


def _to_ours(labels: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """World label ids (0 = background, k = CATEGORIES[k - 1]) -> 0 / class_names.index + 1, 255 elsewhere."""
    lut = torch.full((len(CATEGORIES) + 1,), 255, dtype=torch.long)
    lut[0] = 0
    for i, c in enumerate(CATEGORIES):
        if c in class_names:
            lut[i + 1] = list(class_names).index(c) + 1
    return lut[labels.long()]


def protocol_two_test_set(num_images: int, class_names: Sequence[str] = CATEGORIES,
             split: str = "grounding_test") -> tuple[torch.Tensor, torch.Tensor]:
    """Protocol II's test images: procedural images of all categories with exact labels.

    Returns images (N, 3, 64, 64) uint8 and labels (N, 64, 64) int64 (0 = background,
    ``k`` = ``class_names[k - 1]``, 255 for a category not in ``class_names``).
    """
    b = render(split, 0, num_images)
    return torch.from_numpy(b.images).permute(0, 3, 1, 2).contiguous(), _to_ours(torch.from_numpy(b.labels),
                                                                                 class_names)


SINGLE_OBJECT_START = {"validation": 200_000, "test": 100_000}
"""Where the single-class protocol's images start in the ``grounding_test`` stream (far from protocol II's 0 …)."""


def single_object_set(num_images: int, class_names: Sequence[str] = CATEGORIES,
                      part: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The single-class protocol's images: one object of any category per image, exact labels.

    ``part``: "validation" (chooses t) or "test" (scored), disjoint streams. Returns images (N, 3, 64, 64)
    uint8 and labels (N, 64, 64) int64 in ``class_names``' ids as :func:`protocol_two_test_set`.
    """
    if part not in SINGLE_OBJECT_START:
        raise ValueError(f"part must be one of {sorted(SINGLE_OBJECT_START)}, got {part!r}")
    b = render("grounding_test", SINGLE_OBJECT_START[part], num_images, max_objects=1)
    return torch.from_numpy(b.images).permute(0, 3, 1, 2).contiguous(), _to_ours(torch.from_numpy(b.labels),
                                                                                 class_names)


def ground_truth_seen_dataset(num_images: int, seen: Sequence[str] = SEEN_CATEGORIES,
                              class_names: Sequence[str] = CATEGORIES,
                              split: str = "grounding_gt") -> tuple[torch.Tensor, torch.Tensor]:
    """Protocol II's reference: procedural images drawing only the ``seen`` categories, exact labels.

    Returns images (N, 3, 64, 64) uint8 and labels (N, 64, 64) int64 in ``class_names``' ids as
    :func:`protocol_two_test_set`.
    """
    unknown = set(seen) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not toy categories; known: {list(CATEGORIES)}")
    b = render(split, 0, num_images, categories=tuple(CATEGORIES.index(c) + 1 for c in seen))
    return torch.from_numpy(b.images).permute(0, 3, 1, 2).contiguous(), _to_ours(torch.from_numpy(b.labels),
                                                                                 class_names)


TOY = GroundingDefaults(
    class_sets=CLASS_SETS, segmenter=segmenter, checkpoint=CHECKPOINT, module_config=module_config,
    labelers=LABELERS, default_labeler="oracle", provenance=provenance, segmenter_settings=SEGMENTER_SETTINGS,
    segmenter_net=segmenter_net, protocol_two_test_set=protocol_two_test_set,
    ground_truth_seen_dataset=ground_truth_seen_dataset, single_object_set=single_object_set,
    protocol_two=DATA_DIR / "grounding" / "protocol_two")
"""The toy SD's grounding defaults (its module: ``data/grounding/grounding.pt``)."""

TOY_SD3 = replace(TOY, checkpoint=CHECKPOINT_SD3, provenance=provenance_sd3, protocol_two=None)
"""The toy MM-DiT's: the same world and settings, its own module (``data/grounding/toy-sd3/grounding.pt``); no
protocol-II segmenters are committed for it (notebook 04 trains them with ``RETRAIN_SEGMENTERS = True``)."""
