"""Grounded Diffusion (Li et al., ICCV 2023): open-vocabulary grounding of generated images.

* :mod:`.features`  -- which UNet blocks feed the grounding module (grouped by resolution) and
  generation that captures them in the same denoising pass.
* :mod:`.module`    -- the grounding module (visual encoder + text-query transformer + mask head).
* :mod:`.data`      -- the data pipeline: prompts over seen classes, generation, segmenter labels,
  on-disk shards that resume; dataset synthesis and its ``accelerate launch`` entry point.
* :mod:`.train`     -- batched training and evaluation (protocols I and II).
"""
