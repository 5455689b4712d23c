"""diffseg_utils: the compute kernels behind the diffseg notebooks.

``import diffseg_utils as ds`` gives every entry point:

* backbones: :func:`load_backbone` (short name, hub id, local directory or ADM ``.pt``; SD 1.x/2.x,
  SDXL, SD3 / SD3.5, Flux, PixArt, pixel DDPMs), :class:`Backbone`, :class:`Conditioning`,
  :func:`list_backbones`, :func:`untrained_like`, :func:`adm_blocks`;
* data: :func:`load_dataset`, :func:`list_datasets`, :func:`fewshot_splits`;
  images in and masks back out: :func:`prepare_images`, :func:`geometry_of`, :func:`restore_labels`,
  :func:`prepare_labels`;
* features and analysis (DDPM-Seg Fig. 2–4): :func:`extract_features`, :class:`FeatureMaps`,
  :func:`probe_grid`, :func:`probe_features`, :func:`choose_places`, :func:`decoder_blocks`,
  :func:`baseline_features`;
* DDPM-Seg: :class:`FewShotSegmenter`, :func:`fewshot_miou`;
* EmerDiff: :func:`emerdiff_segment`;
* MM-DiT maps (SD3, Flux): :func:`concept_attention` (ConceptAttention), :class:`JointAttentionMaps`
  (ConceptAttention and joint cross-attention during any denoiser calls);
* Grounded Diffusion and its cross-attention baseline: see :mod:`diffseg_utils.grounding` and
  :func:`daam_segment`;
* metrics: :func:`mean_iou`, :func:`ddpmseg_miou`, :func:`hungarian_miou`, :func:`paired_difference`.
"""
from .attention_maps import daam_segment
from .backbones import Backbone, BlockInfo, Conditioning, adm_blocks, adm_output_block
from .baselines import FLOORS, baseline_features, floor_features, position_features, rgbxy_features
from .datasets import (DDPMSEG_DATASETS, DatasetConfig, FewShotData, Sample, SegmentationDataset, SegmentationSplit,
                       fewshot_splits, list_datasets, load_dataset)
from .ddpmseg import FewShotSegmenter, SegmentationResult, fewshot_miou
from .emerdiff import emerdiff_segment
from .features import FeatureMaps, extract_features
from .grounding.ground import GroundingResult, ground
from .joint_attention import (JointAttentionMaps, JointMapsResult, concept_attention, concept_attention_miou,
                              has_joint_blocks, joint_blocks)
from .inputs import Geometry, ImageLike, geometry_of, prepare_images, prepare_labels, restore_labels
from .loading import WeightsNotAvailableError, load_backbone, untrained_like
from .metrics import PairedDifference, ddpmseg_miou, hungarian_miou, mean_iou, paired_difference
from .probes import ProbeTable, probe_features, probe_grid, rgb_features
from .registry import list_backbones
from .selection import PlaceChoice, choose_places, decoder_blocks

__all__ = [
    "FLOORS", "Backbone", "BlockInfo", "Conditioning", "DatasetConfig", "DDPMSEG_DATASETS", "FeatureMaps", "FewShotData",
    "FewShotSegmenter", "Geometry", "GroundingResult", "ImageLike", "JointAttentionMaps", "JointMapsResult",
    "PairedDifference", "PlaceChoice", "ProbeTable", "Sample", "SegmentationDataset", "SegmentationResult",
    "SegmentationSplit", "WeightsNotAvailableError", "adm_blocks", "adm_output_block", "baseline_features",
    "choose_places", "concept_attention", "concept_attention_miou", "daam_segment", "ddpmseg_miou",
    "decoder_blocks", "emerdiff_segment", "extract_features", "fewshot_miou", "floor_features", "fewshot_splits", "geometry_of",
    "ground", "has_joint_blocks", "hungarian_miou", "joint_blocks", "list_backbones", "list_datasets",
    "load_backbone", "load_dataset", "mean_iou", "paired_difference", "position_features", "prepare_images", "prepare_labels",
    "probe_features", "probe_grid", "restore_labels", "rgb_features", "rgbxy_features", "untrained_like",
]
__version__ = "0.1.0"
