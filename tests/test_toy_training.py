"""The training scripts cannot rot: a few steps of every stage on a micro config, then load."""
import json

import pytest
import torch

from diffseg_utils import WeightsNotAvailableError, load_backbone


@pytest.mark.slow
def test_micro_training_exports_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffseg_utils.toy import train

    out = tmp_path / "sd"
    train.main(["--config", "micro", "--work", str(tmp_path / "work"), "--out", str(out), "--vae-steps", "3",
                "--vae-batch", "2", "--num-latents", "16", "--unet-steps", "3", "--unet-batch", "4",
                "--decoder-steps", "2"])
    log = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"vae", "unet", "vae_dec"}
    bb = load_backbone(str(out), device="cpu")
    assert bb.kind == "latent" and bb.resolution == 64 and bb.latent_resolution == 16
    pipe = StableDiffusionPipeline.from_pretrained(out)
    img = pipe("a photo of a star", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)
    # resuming on a machine that lost the checkpoints continues from the exported weights
    (tmp_path / "work" / "unet.pt").unlink()
    train.main(["--config", "micro", "--work", str(tmp_path / "work"), "--out", str(out), "--stage", "unet",
                "--unet-steps", "5", "--unet-batch", "4"])
    assert torch.load(tmp_path / "work" / "unet.pt", weights_only=False)["step"] == 5


def test_micro_oracle_training(tmp_path):
    from diffseg_utils.toy.oracle import OracleSegmenter, train

    train(tmp_path, steps=2, batch=2, width=4, eval_every=100)
    seg = OracleSegmenter.load(tmp_path)
    out = seg(torch.zeros(2, 3, 64, 64))
    assert out.masks.shape == (2, 10, 64, 64) and out.scores.shape == (2, 10)
    with pytest.raises(FileNotFoundError, match="diffseg_utils.toy.oracle"):
        OracleSegmenter.load(tmp_path / "missing")


def test_missing_toy_model_names_the_training_command(tmp_path, monkeypatch):
    import diffseg_utils.backbones as B
    from diffseg_utils.registry import REGISTRY, RegistryEntry

    monkeypatch.setattr(B, "TOY_SD_DIR", tmp_path / "toy-sd")
    monkeypatch.setitem(REGISTRY, "toy", RegistryEntry(str(tmp_path / "toy-sd"), "latent"))
    with pytest.raises(WeightsNotAvailableError, match="python -m diffseg_utils.toy.train"):
        load_backbone("toy")
    (tmp_path / "toy-sd").mkdir()
    (tmp_path / "toy-sd" / "model_index.json").write_text("{not json")
    with pytest.raises(WeightsNotAvailableError, match="python -m diffseg_utils.toy.train"):
        load_backbone("toy")
