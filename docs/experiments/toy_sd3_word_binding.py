"""Do the toy MM-DiT's class words bind? The token study and ConceptAttention per training checkpoint.

Run: python docs/experiments/toy_sd3_word_binding.py <work dir> [<work dir> ...]   (about 1 min per checkpoint, 2 cores)

For every ``mmdit_<step>.pt`` in each work directory of ``python -m diffseg_utils.toy.train --model sd3``:
the token study of notebook 04 (one-object generations, "a photo of a {}", 32 images, 20 flow steps,
guidance 5, oracle masks as truth: IoU of the class word's joint cross-attention map, of the end-of-text
token's, of the concept token's ConceptAttention mask) and ConceptAttention as a zero-shot segmenter of 20
labelled procedural images (every joint block, t = 500, concepts = the ten classes + "background"); and
where the caption reaches the image (:func:`summary_use`): prompt fidelity with the caption's summary hidden at
inference, and the image queries' joint attention mass on words vs end-of-text / padding tokens.
The first work directory is the run without the fix; the second the fine-tune that hides the caption's
summary (``--hide-summary``). Results are printed as one JSON line per checkpoint.

Measured on 2 CPU cores (steps count from the start; 14,000-18,000 are the fine-tune):

    step    class word  end of text  concept token  whole image  ConceptAttention (20 labelled images)
    12000   0.042       0.015        0.001          0.097        0.016
    14000   0.064       0.011        0.025          0.142        0.029
    16000   0.055       0.010        0.007          0.142        0.034

    summary_use at step 12,000: fidelity 0.469 as is, 0.406 with the summary hidden at inference; image queries'
    joint attention on the words 0.352 / 0.349, on end-of-text + padding 0.602 / 0.605 (as is / hidden).

Reading: the MM-DiT reads its words without the summary (the toy SD does not: 0.97 -> 0.38,
``toy_sd_word_binding.py``), yet its image queries attend to the end-of-text / padding positions, whose states
joint attention can rebuild from the words inside the transformer; hiding the summary at the input does not
make the class word's own map localise. ("whole image" differs between rows because the scored generations
differ: the model draws the prompted object more often.)
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import diffseg_utils as ds
from diffseg_utils.grounding.diagnostics import cross_attention_tokens
from diffseg_utils.joint_attention import JointAttentionMaps
from diffseg_utils.sampling import generate
from diffseg_utils.toy.grounding_defaults import oracle_segmenter, protocol_two_test_set
from diffseg_utils.toy.oracle import OracleSegmenter
from diffseg_utils.toy.quality import backbone_from_checkpoint, fidelity_prompts
from diffseg_utils.toy.train import hide_summary
from diffseg_utils.toy.world import CATEGORIES
from diffseg_utils.registry import DATA_DIR


def summary_use(bb, n: int = 32) -> dict:
    """Where the caption reaches the image: prompt fidelity with the caption's summary (end-of-text, padding,
    pooled) as is and replaced by the empty prompt's at inference, and the joint attention mass of image queries
    on the word tokens vs the end-of-text / padding tokens (conditional rows, 20 steps, every joint block)."""
    tok = bb.prompt_tokenizer
    oracle = OracleSegmenter.load(DATA_DIR / "oracle")
    prompts, classes = fidelity_prompts(n, 0, 2)
    ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    empty = bb.encode_prompt([""])
    encode = bb.encode_prompt

    def hidden(ps):
        c = encode(ps)
        i = tok(list(ps), padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        keep = torch.tensor([bool(p) for p in ps])
        return replace(c, embeds=hide_summary(c.embeds, i, tok.eos_token_id, empty.embeds, keep),
                       pooled=torch.where(keep[:, None], empty.pooled, c.pooled))

    out = {}
    for name, fn in (("as is", encode), ("summary hidden", hidden)):
        bb.encode_prompt = fn
        try:
            with JointAttentionMaps(bb, rows="second_half") as jam:
                imgs = generate(bb, prompts, num_steps=20, guidance_scale=5.0, seed=0)
        finally:
            bb.encode_prompt = encode
        found = oracle(imgs).scores > 0
        out[f"fidelity, {name}"] = sum(all(bool(r[c - 1]) for c in cl) for r, cl in zip(found, classes)) / n
        m = jam.maps.mean((-2, -1))                       # (N, L): mean probability per text token
        after = (ids == tok.eos_token_id).int().cumsum(1) > 0
        words = ~after
        words[:, 0] = False                               # the start token is not a word
        out[f"attention on words, {name}"] = float((m * words).sum(1).div(m.sum(1)).mean())
        out[f"attention on end of text + padding, {name}"] = float((m * after).sum(1).div(m.sum(1)).mean())
    return {k: round(v, 3) for k, v in out.items()}


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
                              **{role: round(v["a photo of a {}"], 3) for role, v in iou.items()},
                              "concept_attention_real": round(miou, 3), **summary_use(bb)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
