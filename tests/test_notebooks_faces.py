"""The second (backbone, dataset) pair: notebooks 00-02 run on the pixel DDPM and its faces world
through their parameter cells (papermill injects BACKBONE / DATASET), and their self-checks compare
the numbers with those committed for these parameters."""
import json

import pytest

pytest.importorskip("papermill")

from diffseg_utils.__main__ import reproduce  # noqa: E402

# CI-sized settings (the full-size run, mean over 3 splits on every labelled pixel, is executed in
# docs/runs/toy-faces-ddpm__toy-faces/ and its numbers are committed beside these)
CI_PARAMS = {"N_SPLITS": 1, "LABEL_SIZES": [2, 20], "N_SAMPLES": 16, "TIMESTEPS": [0, 25, 50, 150, 500, 999]}


@pytest.mark.slow
def test_notebooks_run_on_the_faces_pixel_ddpm(tmp_path):
    root = reproduce(["00", "01", "02"], backbone="toy-faces-ddpm", dataset="toy-faces", params=CI_PARAMS,
                     results=tmp_path, progress=False)
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        out = "".join("".join(o.get("text", "")) for o in cells[-1].get("outputs", []))
        assert ": ok" in out and "differs" not in out, f"{nb.name}: self-check did not pass:\n{out}"
    summary = (root / "summary.md").read_text()
    assert "toy-faces-ddpm" in summary and "ddpm_miou" in summary
