"""Grounded Diffusion (Li et al., ICCV 2023): open-vocabulary grounding of generated images.

* :mod:`.features`   -- which UNet blocks feed the grounding module (grouped by resolution) and
  generation that captures them in the same denoising pass.
* :mod:`.module`     -- the grounding module (visual encoder + text-query transformer + mask head).
* :mod:`.prompts`    -- the backbone's prompt template, prompts and seeds of samples.
* :mod:`.segmenter`  -- the segmenter / detector interface (:class:`~.segmenter.SegmenterOutput`).
* :mod:`.labelers`   -- labels for generated images: a segmenter's, or the grounding module's.
* :mod:`.shards`     -- dataset synthesis into resumable shards, lazy (memory-mapped) reading.
* :mod:`.export`     -- PNG export of a segmentation dataset; :mod:`.synth` its ``accelerate launch`` CLI.
* :mod:`.train`      -- batched training; :mod:`.protocols` evaluation (protocols I and II).
* :mod:`.defaults`   -- how dataset-specific defaults (class lists, labelers) are supplied.
* :mod:`.ground`     -- :func:`ground`, the one call: (backbone, module, images or prompts, names) -> labels/masks/scores.
* :mod:`.diagnostics` -- which prompt tokens the cross-attention follows (the DAAM baseline's premise, measured).
* :mod:`.plots`      -- notebook 04's figures.
"""
from .ground import GroundingResult, ground

__all__ = ["GroundingResult", "ground"]
