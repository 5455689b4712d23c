"""Notebook 02 on a synthetic data set, scored on real images, from its parameter cell (protocol II's other use):
DATASET = an exported folder (images/, masks/, classes.json, as notebook 04 writes it), TEST_DATASET = the world."""
import json

import numpy as np
import pytest

pytest.importorskip("papermill")

from diffseg_utils.__main__ import reproduce  # noqa: E402
from diffseg_utils.grounding.export import export_segmentation_dataset  # noqa: E402
from diffseg_utils.toy.world import CATEGORIES, render  # noqa: E402


@pytest.mark.slow
def test_notebook_02_trains_on_a_synthetic_folder_and_scores_real_images(tmp_path):
    b = render("eval", 0, 12)   # stands in for generated images: the notebook only sees the folder
    folder = tmp_path / "synthetic"
    export_segmentation_dataset(folder, b.images, b.labels.astype(np.int64), CATEGORIES)
    params = {"TEST_DATASET": "toy-shapes", "N_TRAIN": 4, "N_VAL": 4, "N_TEST": 4,
              "N_SPLITS": 1, "SWEEP_TIMESTEPS": [50], "LABEL_SIZES": [2, 4], "MAX_PIXELS": 2000}
    root = reproduce(["02"], dataset=str(folder), results=tmp_path / "results", progress=False, params=params)
    nb = json.loads(next((root / "notebooks").glob("02_*.ipynb")).read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert "test images from 'toy-shapes'" in text
    metrics = json.loads((root / "metrics" / "02_few_shot_segmentation.json").read_text())
    assert 0 <= metrics["ddpm_miou"]["value"] <= 1
