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
* :mod:`.protocol_two` -- protocol II over training-set sizes (synthetic vs seen-only vs ground truth), its CLI.
* :mod:`.single_class` -- the single-class protocol on real labelled images (ImageNet-Segmentation's).
* :mod:`.ground`     -- :func:`ground`, the one call: (backbone, module, images or prompts, names) -> labels/masks/scores.
* :mod:`.diagnostics` -- which prompt tokens the cross-attention follows (the DAAM baseline's premise, measured).
* :mod:`.plots`      -- notebook 04's figures.

Every entry point notebook 04 uses is importable from here (``from diffseg_utils import grounding as gd``).
"""
from .defaults import GroundingDefaults, resolve_defaults
from .diagnostics import cross_attention_tokens
from .export import export_segmentation_dataset
from .features import feature_groups
from .ground import GroundingResult, ground, ground_explorer
from .labelers import GroundingLabeler, SegmenterLabeler, weights_fingerprint
from .module import GroundingModule, class_embeddings
from .plots import show_loss, show_protocol_one, show_protocol_two, show_shards, show_token_study
from .prompts import PAPER_TEMPLATE, prompt_template
from .protocol_two import SOURCES as PROTOCOL_TWO_SOURCES, load_segmenters, protocol_two_curve
from .protocols import evaluate_on_generations, evaluate_segmenter, fit_segmenter
from .shards import GroundingShards, synthesize
from .single_class import SingleClassResult, evaluate_single_class
from .train import train_grounding

__all__ = ["GroundingDefaults", "GroundingLabeler", "GroundingModule", "GroundingResult", "GroundingShards",
           "PAPER_TEMPLATE", "PROTOCOL_TWO_SOURCES", "SegmenterLabeler", "SingleClassResult", "class_embeddings", "cross_attention_tokens", "evaluate_on_generations",
           "evaluate_segmenter", "evaluate_single_class", "export_segmentation_dataset", "feature_groups", "fit_segmenter", "ground",
           "ground_explorer", "load_segmenters", "prompt_template", "protocol_two_curve", "resolve_defaults", "show_loss", "show_protocol_one", "show_protocol_two", "show_shards",
           "show_token_study", "synthesize", "train_grounding", "weights_fingerprint"]
