"""The third (backbone, dataset) pair: every notebook runs on the toy MM-DiT (`toy-sd3`, an SD3-architecture
transformer trained here) through its parameter cell, CI-sized.

There are no committed numbers for this CI size, so this test checks that every notebook runs on a transformer
and that what the notebooks compute holds on the recorded numbers, with margins half the gaps measured at
this size."""
import json

import pytest

pytest.importorskip("papermill")

from diffseg_utils.__main__ import reproduce  # noqa: E402
from diffseg_utils.registry import TOY_SD3_DIR  # noqa: E402

SMALL = {"N_FIDELITY": 16, "N_TRAIN": 8, "N_VAL": 8, "N_TEST": 8, "TIMESTEPS": [50, 300], "N_SPLITS": 1,
         "SWEEP_TIMESTEPS": [50, 300], "LABEL_SIZES": [2, 8], "N_IMAGES": 8, "LAMS": [10.0], "LAYERS": ["query"],
         "T_MS": [281], "N_EVAL": 16, "N_TOKENS": 8, "N_SYNTH": 16, "N_SEG_TEST": 32, "N_REAL_VAL": 8, "N_SINGLE": 16,
         "REAL_T": [500]}


def _metrics(root, nb):
    return {k: v["value"] for k, v in json.loads((root / "metrics" / f"{nb}.json").read_text()).items()}


@pytest.mark.slow
@pytest.mark.skipif(not (TOY_SD3_DIR / "model_index.json").exists(), reason="data/toy-sd3 is not shipped")
def test_every_notebook_runs_on_the_toy_mmdit(tmp_path):
    root = reproduce(None, backbone="toy-sd3", dataset="toy-shapes", results=tmp_path, progress=False, params=SMALL)
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        out = "".join("".join(o.get("text", "")) for o in cells[-1].get("outputs", []))
        assert "differs" not in out, f"{nb.name}: self-check failed:\n{out}"
    m02 = _metrics(root, "02_few_shot_segmentation")
    assert m02["ddpm_miou"] >= m02["untrained_miou"] + MARGIN_DDPM, m02
    m03 = _metrics(root, "03_emerdiff")
    assert {"emerdiff_miou", "bilinear_miou", "emerdiff_minus_bilinear"} <= set(m03)
    m04 = _metrics(root, "04_grounding")
    assert {"protocol1_concept_attention_seen_miou", "protocol1_joint_cross_attention_seen_miou",
            "concept_attention_real_miou"} <= set(m04)
    assert "protocol1_daam_seen_miou" not in m04   # no cross-attention on an MM-DiT


MARGIN_DDPM = 0.0075
"""Half the gap measured at this CI size on the shipped step-16,000 weights (ensemble 0.088 vs untrained 0.073, 8
labelled images, one split): the toy MM-DiT is under-trained (data/toy-sd3/README.md), so the margin is small; a
broken feature path falls to the floor."""
