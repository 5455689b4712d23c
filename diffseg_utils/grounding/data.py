"""Backward-compatible imports: this module was split by job into

* :mod:`.prompts`   -- prompt templates, prompts and seeds of samples;
* :mod:`.labelers`  -- labelers (segmenter, grounding module), weight fingerprints;
* :mod:`.shards`    -- synthesis into resumable shards and lazy reading;
* :mod:`.export`    -- PNG export of a segmentation dataset and reading it back.

Import from those modules; this one only re-exports their names for old code.
"""
from .export import export_segmentation_dataset, load_segmentation_dataset  # noqa: F401
from .labelers import Labeler, SegmenterLabeler, labeler_config, weights_fingerprint  # noqa: F401
from .prompts import MAX_CLASSES, PAPER_TEMPLATE, sample_prompt, sample_seed  # noqa: F401
from .shards import (INDEX, MANIFEST, SYNTH_COMMAND, GroundingShards, MissingShardsError,  # noqa: F401
                     num_shards, read_manifest, resume_command, shard_path, synthesize, to_uint8, write_index)

DEFAULT_TEMPLATE = PAPER_TEMPLATE
"""Old name of :data:`~.prompts.PAPER_TEMPLATE`; entry points now use the backbone's template."""
