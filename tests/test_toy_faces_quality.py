"""The shipped pixel DDPM on its faces world: the few-shot numbers DDPM-Seg's claim rests on, with
margins a broken pipeline fails (untrained weights, raw colour and position, an uninformative place)."""
import pytest

from diffseg_utils import load_backbone, untrained_like
from diffseg_utils.toy.quality import fewshot_probe, fewshot_probe_rgb

# measured on the shipped weights (step 5000) at the place gates.json records for them
# (up_blocks.0, t = 25); a probe on 20 labelled faces, one DDPM-Seg member MLP, 20 test faces
MEASURED = {"trained": 0.625, "untrained": 0.197, "rgbxy": 0.235, "noise_level_999": 0.231}


@pytest.fixture(scope="module")
def faces():
    return load_backbone("toy-faces-ddpm", device="cpu")


@pytest.fixture(scope="module")
def place(faces):
    import json

    from diffseg_utils.registry import TOY_FACES_DIR

    last = json.loads((TOY_FACES_DIR / "gates.json").read_text())["checkpoints"][-1]
    return last["probe_block"], last["probe_t"]


@pytest.mark.slow
def test_features_beat_untrained_weights_colour_and_position(faces, place):
    kw = dict(world="faces", at=place, timesteps=(place[1],), seed=0)
    trained = fewshot_probe(faces, **kw).mlp
    untrained = fewshot_probe(untrained_like(faces, seed=0), **kw).mlp
    rgbxy = fewshot_probe_rgb(world="faces", position=True, seed=0).mlp
    gap_u, gap_p = MEASURED["trained"] - MEASURED["untrained"], MEASURED["trained"] - MEASURED["rgbxy"]
    assert trained >= untrained + gap_u / 2, (trained, untrained)
    assert trained >= rgbxy + gap_p / 2, (trained, rgbxy)


@pytest.mark.slow
def test_an_uninformative_noise_level_fails(faces, place):
    """At t = 999 the input is nearly pure noise: the same probe must fall far below the chosen place."""
    trained = fewshot_probe(faces, world="faces", at=(place[0], 999), timesteps=(999,), seed=0).mlp
    gap = MEASURED["trained"] - MEASURED["noise_level_999"]
    assert trained <= MEASURED["trained"] - gap / 2, trained


def test_gates_record_ends_at_the_shipped_step():
    import json

    from diffseg_utils.registry import TOY_FACES_DIR

    shipped = json.loads((TOY_FACES_DIR / "training_state.json").read_text())["step"]
    assert json.loads((TOY_FACES_DIR / "gates.json").read_text())["checkpoints"][-1]["step"] == shipped


def test_shipped_faces_ddpm_loads_offline_and_samples():
    import torch
    from diffusers import DDPMPipeline

    from diffseg_utils.registry import TOY_FACES_DIR

    bb = load_backbone("toy-faces-ddpm", device="cpu")
    assert bb.kind == "pixel" and bb.resolution == 64 and bb.dataset == "toy-faces"
    img = DDPMPipeline.from_pretrained(TOY_FACES_DIR)(batch_size=1, num_inference_steps=2, output_type="np",
                                                      generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)
