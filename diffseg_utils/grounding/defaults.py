"""Dataset- and backbone-specific grounding defaults, supplied by the side that knows them.

General code never names a particular world. A *defaults provider* is any object or module with
some of these attributes (all optional); the toy world's is :mod:`diffseg_utils.toy.grounding_defaults`:

    CLASS_SETS        {"seen": (...), "unseen": (...), "all": (...)}: names the CLIs accept for --classes
    LABELERS          {name: factory(args, backbone) -> Labeler}: extra --labeler choices
    DEFAULT_LABELER   the --labeler used when none is given
    CHECKPOINT        path of a shipped grounding module (the --grounding-ckpt default)
    segmenter(device) the segmenter that labels generated images (protocol I's ground truth)
    module_config()   the GroundingConfig the train CLI uses by default
    provenance(bb)    a JSON dict recorded beside a trained module (what it was trained against)
    protocol II       SEGMENTER_SETTINGS {"quick"|"full": fit_segmenter kwargs}, segmenter_net(num_classes, seed=),
                      protocol_two_test_set(n, class_names), ground_truth_seen_dataset(n, seen, class_names)

The CLIs take ``--defaults package.module`` or, without it, the backbone's ``grounding_defaults``
attribute (a module path or an object).
"""
from __future__ import annotations

import importlib
from typing import Any


def resolve_defaults(spec: Any = None, backbone: Any = None) -> Any:
    """The defaults provider: ``spec`` (a module path, ``"pkg.mod:NAME"``, or an object), else the
    backbone's ``grounding_defaults`` attribute, else None (every setting must then be given)."""
    if spec is None:
        spec = getattr(backbone, "grounding_defaults", None)
    if spec is None or not isinstance(spec, str):
        return spec
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"cannot import the grounding defaults {spec!r} ({e}); pass --defaults as an importable "
                         "module path such as diffseg_utils.toy.grounding_defaults") from e
    if attr:
        if not hasattr(obj, attr):
            raise ValueError(f"{mod} has no attribute {attr!r} (from --defaults {spec!r})")
        obj = getattr(obj, attr)
    return obj
