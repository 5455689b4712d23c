"""The second (backbone, dataset) pair: notebooks 00-02 run on the pixel DDPM and its faces world
through their parameter cells (papermill injects BACKBONE / DATASET).

Notebooks 00 and 01 run with their default parameters, so their self-checks compare every number with
the committed full-size run (docs/runs/toy-faces-ddpm__toy-faces). Notebook 02 runs CI-sized (one split,
two label counts): its self-check has no committed numbers for that setting, so this test checks what
DDPM-Seg claims on the recorded numbers themselves, with margins half the gaps measured at full size."""
import json
import os

import pytest

pytest.importorskip("papermill")

from diffseg_utils.__main__ import reproduce  # noqa: E402


def _self_check_output(nb) -> str:
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    return "".join("".join(o.get("text", "")) for o in cells[-1].get("outputs", []))


@pytest.mark.slow
def test_notebooks_run_on_the_faces_pixel_ddpm(tmp_path):
    root = reproduce(["00", "01"], backbone="toy-faces-ddpm", dataset="toy-faces", results=tmp_path, progress=False)
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        out = _self_check_output(nb)
        assert ": ok" in out and "differs" not in out, f"{nb.name}: self-check did not pass:\n{out}"
        # figures come back even when this process's MPLBACKEND is a headless one (CI sets Agg)
        figures = sum("image/png" in o.get("data", {}) for c in json.loads(nb.read_text())["cells"]
                      for o in c.get("outputs", []))
        assert figures >= 2, f"{nb.name}: {figures} figures in the executed notebook (MPLBACKEND={os.environ.get('MPLBACKEND')})"
    root = reproduce(["02"], backbone="toy-faces-ddpm", dataset="toy-faces", results=tmp_path, progress=False,
                     params={"N_SPLITS": 1, "LABEL_SIZES": [2, 20]})
    m = {k: v["value"] for k, v in json.loads((root / "metrics" / "02_few_shot_segmentation.json").read_text()).items()}
    # full size (3 splits): ensemble 0.6+ vs untrained UNet ~0.25 and colour + position ~0.2
    assert m["ddpm_miou"] >= m["untrained_miou"] + 0.15, m
    assert m["ddpm_miou"] >= m["rgbxy_miou"] + 0.15, m
    assert m["label_efficiency"]["20"] > m["label_efficiency"]["2"], m
    summary = (root / "summary.md").read_text()
    assert "toy-faces-ddpm" in summary and "ddpm_miou" in summary


@pytest.mark.slow
def test_a_portrait_labelled_folder_runs_through_notebooks_01_to_03(tmp_path):
    """Your own data, as it comes: a labelled folder (train/ and test/, images/ JPG, masks/ PNG, classes.json) of
    portrait 96x72 faces runs through notebooks 01-03 from their parameter cells (letterboxed, the border
    ignored, scored at each image's own size), CI-sized."""
    import numpy as np
    from PIL import Image

    from diffseg_utils.toy.faces import PARTS, render_faces

    folder = tmp_path / "portraits"
    for split, src, n in (("train", "fewshot_train", 12), ("test", "fewshot_test", 8)):
        b = render_faces(src, 0, n, size=96)
        for sub in ("images", "masks"):
            (folder / split / sub).mkdir(parents=True)
        for i in range(n):   # crop 96x96 to a 96x72 portrait (12 columns off each side)
            Image.fromarray(b.images[i][:, 12:84]).save(folder / split / "images" / f"{i:03d}.jpg", quality=95)
            Image.fromarray(b.labels[i][:, 12:84]).save(folder / split / "masks" / f"{i:03d}.png")
    (folder / "classes.json").write_text(json.dumps({"class_names": ["background", *PARTS]}))
    small = {"N_TRAIN": 4, "N_VAL": 4, "N_TEST": 6, "TIMESTEPS": [50, 300], "PER_CLASS": 200, "N_SPLITS": 1,
             "SWEEP_TIMESTEPS": [50, 300], "LABEL_SIZES": [2, 4], "N_IMAGES": 4, "VAL_SPLIT": "train", "K": 4,
             "LAMS": [10.0], "LAYERS": ["query"], "T_MS": [281], "NUM_STEPS": 10}
    root = reproduce(["01", "02", "03"], backbone="toy-faces-ddpm", dataset=str(folder), results=tmp_path / "res",
                     progress=False, params=small)
    for nb in ("01_representation_analysis", "02_few_shot_segmentation", "03_emerdiff"):
        m = json.loads((root / "metrics" / f"{nb}.json").read_text())
        assert m, f"{nb} recorded nothing"
    assert 0 < json.loads((root / "metrics" / "02_few_shot_segmentation.json").read_text())["ddpm_miou"]["value"] <= 1
