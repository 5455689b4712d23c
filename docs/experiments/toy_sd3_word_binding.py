"""Do the toy MM-DiT's class words bind? The token study and ConceptAttention per training checkpoint.

Run: python docs/experiments/toy_sd3_word_binding.py <work dir> [<work dir> ...]   (about 1 min per checkpoint, 2 cores)

For every ``mmdit_<step>.pt`` in each work directory of ``python -m diffseg_utils.toy.train --model sd3``:
the token study of notebook 04 (one-object generations, "a photo of a {}", 32 images, 20 flow steps,
guidance 5, oracle masks as truth: IoU of the class word's joint cross-attention map, of the end-of-text
token's, of the concept token's ConceptAttention mask) and ConceptAttention as a zero-shot segmenter of 20
labelled procedural images (every joint block, t = 500, concepts = the ten classes + "background").
The first work directory is the run without the fix; the second the fine-tune that hides the caption's
summary (``--mmdit-hide-summary``). Results are printed as one JSON line per checkpoint.
"""
import json
import sys
from pathlib import Path

import torch

import diffseg_utils as ds
from diffseg_utils.grounding.diagnostics import cross_attention_tokens
from diffseg_utils.toy.grounding_defaults import oracle_segmenter, protocol_two_test_set
from diffseg_utils.toy.quality import backbone_from_checkpoint
from diffseg_utils.toy.world import CATEGORIES


def main(work_dirs: list[str]) -> None:
    torch.set_num_threads(2)
    base = ds.load_backbone("toy-sd3", device="cpu")
    seg = oracle_segmenter()
    images, labels = protocol_two_test_set(20, CATEGORIES)
    for work in map(Path, work_dirs):
        for ck in sorted(work.glob("mmdit_*.pt"), key=lambda p: int(p.stem.split("_")[1])):
            bb = backbone_from_checkpoint(base, ck)
            study = cross_attention_tokens(bb, seg, CATEGORIES, ["a photo of a {}"], num_images=32, progress=False)
            iou = study.table()
            miou, _ = ds.concept_attention_miou(bb, images, labels, CATEGORIES, timesteps=(500,))
            print(json.dumps({"run": work.name, "step": int(ck.stem.split("_")[1]),
                              **{role: round(v["a photo of a {}"], 3) for role, v in iou.items()}, "concept_attention_real": round(miou, 3)}),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
