"""The shipped toy model (data/toy-sd) loads offline, generates, reconstructs well and follows prompts."""
import torch

from diffseg_utils import load_backbone
from diffseg_utils.registry import TOY_SD_DIR


def test_toy_loads_offline_and_generates():
    from diffusers import StableDiffusionPipeline

    bb = load_backbone("toy", device="cpu")
    assert bb.kind == "latent" and bb.resolution == 64 and bb.latent_resolution == 16 and bb.latent_channels == 4
    assert sum(b.resolution == (8, 8) for b in bb.blocks().values() if ".attentions." in b.name) >= 2
    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD_DIR, local_files_only=True)
    img = pipe("a photo of a ring", num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and img.std() > 0.01


def test_toy_vae_reconstruction_psnr():
    from diffseg_utils.toy.quality import reconstruction_psnr

    assert reconstruction_psnr(load_backbone("toy", device="cpu"), n=16) >= 28.0


def test_oracle_segmenter_reaches_target_on_held_out_images():
    """Issue target: mIoU >= 0.90 on held-out procedural images (here the first 200 of oracle_test)."""
    from diffseg_utils.registry import DATA_DIR
    from diffseg_utils.toy.oracle import OracleSegmenter, evaluate

    seg = OracleSegmenter.load(DATA_DIR / "oracle")
    assert evaluate(seg, n=200) >= 0.90
    out = seg(torch.zeros(2, 3, 64, 64))
    assert out.masks.shape == (2, 10, 64, 64) and out.scores.shape == (2, 10)


def test_prompt_fidelity_reaches_target():
    """Issue target: the oracle finds every prompted category in >= 80% of guided generations
    (notebook 00: 95% of 64 images at 25 DDIM steps; here 32 images at 20 steps)."""
    from diffseg_utils.registry import DATA_DIR
    from diffseg_utils.toy.oracle import OracleSegmenter
    from diffseg_utils.toy.quality import prompt_fidelity

    fid = prompt_fidelity(load_backbone("toy", device="cpu"), OracleSegmenter.load(DATA_DIR / "oracle"), n=32,
                          num_steps=20, guidance_scale=5.0, seed=0)
    print(fid)
    assert fid["all_found"] >= 0.80


def test_gate_record_covers_the_shipped_weights():
    """data/toy-sd/gates.json (notebook 00's training curve) must end at the shipped UNet step;
    after more training, rerun `python -m diffseg_utils.toy.train --stage gate`."""
    import json

    rec = json.loads((TOY_SD_DIR / "gates.json").read_text())
    step = json.loads((TOY_SD_DIR / "training_state.json").read_text())["unet_step"]
    steps = [r["step"] for r in rec["checkpoints"]]
    assert steps == sorted(steps) and steps[-1] == step


def test_fewshot_probe_names_an_unknown_place():
    import pytest

    from diffseg_utils.toy.quality import fewshot_probe

    bb = load_backbone("toy", device="cpu")
    with pytest.raises(ValueError, match="not a probed place; blocks: .*up_blocks"):
        fewshot_probe(bb, n_train=2, n_test=2, timesteps=(100,), at=("down_blocks.0", 100))
    with pytest.raises(ValueError, match="would reach the validation images"):
        fewshot_probe(bb, n_train=2, n_test=20, timesteps=(100,), at=("up_blocks.0", 100), test_start=9_990)


def test_gates_score_validation_images_only():
    """The training gates' probe images lie past the place-picking validation images, never in the test split."""
    from diffseg_utils.datasets import PROCEDURAL_SPLIT_SIZE, VALIDATION_START
    from diffseg_utils.toy.quality import GATE_START, VAL_START

    assert VAL_START == VALIDATION_START and GATE_START >= VAL_START + 20 and GATE_START >= PROCEDURAL_SPLIT_SIZE
