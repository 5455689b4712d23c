"""Dataset- and backbone-specific grounding defaults, supplied by the side that knows them.

General code never names a particular world: what Grounded Diffusion needs to know beyond the
backbone (class sets, the segmenter that labels generations, a shipped module, protocol II's data)
comes in one :class:`GroundingDefaults` object. The toy world's are
``diffseg_utils.toy.grounding_defaults:TOY`` (toy SD) and ``:TOY_SD3`` (toy MM-DiT): the same world,
each with the grounding module trained on its backbone's features.

The CLIs take ``--defaults package.module:NAME`` or, without it, the backbone's ``grounding_defaults``
(a registry entry names it); the notebook takes ``DEFAULTS``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GroundingDefaults", "resolve_defaults"]


@dataclass(frozen=True)
class GroundingDefaults:
    """Everything Grounded Diffusion needs that is specific to a world and a backbone (all optional but
    ``class_sets`` and ``segmenter``; the CLIs and notebook 04 say which missing one a step needs).

    class_sets:        ``{"seen": (...), "unseen": (...), "all": (...)}``: the class names (``--classes`` sets).
    segmenter:         ``segmenter(device) -> Segmenter``: labels generated images; protocol I's ground truth.
    checkpoint:        a trained grounding module (``.pt``; its ``.json`` beside it) for this backbone.
    module_config:     ``module_config() -> GroundingConfig``: the module the train CLI builds.
    labelers:          extra ``--labeler`` choices, ``name -> factory(args, backbone) -> Labeler``.
    default_labeler:   the ``--labeler`` used when none is given.
    provenance:        ``provenance(backbone) -> dict`` recorded beside a trained module.
    segmenter_settings: protocol II's segmenter training, :func:`~.protocols.fit_segmenter` keywords (budget, augmentation).
    segmenter_net:     ``segmenter_net(num_classes, seed=) -> nn.Module``: protocol II's segmenter.
    protocol_two_test_set: ``(n, class_names) -> (images uint8 (N, 3, H, W), labels int64 (N, H, W))``.
    ground_truth_seen_dataset: ``(n, seen, class_names) -> (images, labels)``: protocol II's reference.
    single_object_set: ``(n, class_names, part) -> (images, labels)``, one object per image, ``part`` "validation"
                       or "test": the single-class protocol's real images
                       (:func:`~diffseg_utils.grounding.single_class.evaluate_single_class`).
    protocol_two:      a folder written by ``python -m diffseg_utils.grounding.protocol_two`` for this backbone
                       (``results.json`` and the kept segmenters), read by notebook 04.
    """

    class_sets: Mapping[str, tuple[str, ...]]
    segmenter: Callable[..., Any]
    checkpoint: Path | None = None
    module_config: Callable[[], Any] | None = None
    labelers: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    default_labeler: str | None = None
    provenance: Callable[[Any], dict] | None = None
    segmenter_settings: Mapping[str, Any] = field(default_factory=dict)
    segmenter_net: Callable[..., Any] | None = None
    protocol_two_test_set: Callable[..., Any] | None = None
    ground_truth_seen_dataset: Callable[..., Any] | None = None
    single_object_set: Callable[..., Any] | None = None
    protocol_two: Path | None = None

    def __post_init__(self):
        missing = {"seen", "unseen", "all"} - set(self.class_sets)
        if missing:
            raise ValueError(f"class_sets needs the keys 'seen', 'unseen' and 'all'; missing {sorted(missing)}")


def resolve_defaults(spec: Any = None, backbone: Any = None) -> GroundingDefaults | None:
    """The defaults: ``spec`` (a :class:`GroundingDefaults`, or ``"package.module:NAME"`` naming one), else the
    backbone's ``grounding_defaults``, else None (every setting must then be given)."""
    if spec is None:
        spec = getattr(backbone, "grounding_defaults", None)
    if spec is None or isinstance(spec, GroundingDefaults):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"grounding defaults must be a GroundingDefaults or 'package.module:NAME', got {spec!r} "
                         "(e.g. 'diffseg_utils.toy.grounding_defaults:TOY')")
    mod, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load the grounding defaults {spec!r} ({e}); pass 'package.module:NAME' naming a "
                         "GroundingDefaults, such as diffseg_utils.toy.grounding_defaults:TOY") from e
    if not isinstance(obj, GroundingDefaults):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a GroundingDefaults")
    return obj
