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
    # the gate stage measures every checkpoint once and only new ones on a rerun
    gate_args = ["--config", "micro", "--work", str(tmp_path / "work"), "--out", str(out), "--stage", "gate",
                 "--gate-fidelity", "2", "--gate-probe", "2"]
    train.main(gate_args)
    rec = json.loads((out / "gates.json").read_text())
    assert [r["step"] for r in rec["checkpoints"]] == [5]
    assert {"fidelity_all_found", "probe_mlp", "probe_fg_iou", "probe_class_acc_on_fg"} <= set(rec["checkpoints"][0])
    assert 0 <= rec["untrained"]["mlp"] <= 1 and rec["rgb"]["block"] == "rgb"
    train.main(gate_args)
    assert json.loads((out / "gates.json").read_text())["checkpoints"] == rec["checkpoints"]
    log = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "gate"] == [5]  # measured once, not again on the rerun


def test_checkpoint_loading_names_a_wrong_file(tmp_path, sd_tiny):
    from diffseg_utils.toy.quality import backbone_from_checkpoint

    torch.save({"model": {}}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="not a checkpoint of diffseg_utils.toy.train"):
        backbone_from_checkpoint(sd_tiny, tmp_path / "vae.pt")
    # other weights than the backbone's (doubled), so that a load that did nothing fails
    double = lambda m: {k: v * 2 if v.is_floating_point() else v for k, v in m.state_dict().items()}  # noqa: E731
    st = {"unet": double(sd_tiny.denoiser), "text": double(sd_tiny.text_encoder)}
    torch.save({"ema": st, "step": 7}, tmp_path / "unet_7.pt")
    bb = backbone_from_checkpoint(sd_tiny, tmp_path / "unet_7.pt")
    assert bb.name.endswith("step 7") and bb.denoiser is not sd_tiny.denoiser
    torch.testing.assert_close(bb.denoiser.state_dict(), st["unet"])
    torch.testing.assert_close(bb.text_encoder.state_dict(), st["text"])
    assert not torch.equal(next(sd_tiny.denoiser.parameters()), next(bb.denoiser.parameters()))  # the original is untouched
    st["unet"] = {k: v[..., :1] if v.ndim else v for k, v in st["unet"].items()}  # wrong shapes: another config
    torch.save({"ema": st, "step": 8}, tmp_path / "unet_8.pt")
    with pytest.raises(ValueError, match="another model config"):
        backbone_from_checkpoint(sd_tiny, tmp_path / "unet_8.pt")


def test_micro_oracle_training(tmp_path):
    from diffseg_utils.toy.oracle import OracleSegmenter, train

    train(tmp_path, steps=2, batch=2, width=4, eval_every=100)
    seg = OracleSegmenter.load(tmp_path)
    out = seg(torch.zeros(2, 3, 64, 64))
    assert out.masks.shape == (2, 10, 64, 64) and out.scores.shape == (2, 10)
    with pytest.raises(FileNotFoundError, match="diffseg_utils.toy.oracle"):
        OracleSegmenter.load(tmp_path / "missing")


def test_missing_toy_model_names_the_training_command(tmp_path, monkeypatch):
    import diffseg_utils.loading as B
    from diffseg_utils.registry import REGISTRY, RegistryEntry

    monkeypatch.setattr(B, "TOY_SD_DIR", tmp_path / "toy-sd")
    monkeypatch.setitem(REGISTRY, "toy", RegistryEntry(str(tmp_path / "toy-sd"), "latent"))
    with pytest.raises(WeightsNotAvailableError, match="python -m diffseg_utils.toy.train"):
        load_backbone("toy")
    (tmp_path / "toy-sd").mkdir()
    (tmp_path / "toy-sd" / "model_index.json").write_text("{not json")
    with pytest.raises(WeightsNotAvailableError, match="python -m diffseg_utils.toy.train"):
        load_backbone("toy")


def _weights(path):
    st = torch.load(path, weights_only=True)
    return st["ema"], st.get("unet")


@pytest.mark.slow
def test_pixel_ddpm_resumed_run_equals_uninterrupted(tmp_path):
    """Killed at step 4 and resumed, the faces DDPM reaches the very weights of a run that never
    stopped: the noise generator's state is checkpointed, the data is fixed by the step."""
    from diffseg_utils.toy.models import PIXEL_MICRO
    from diffseg_utils.toy.train import train_pixel_ddpm

    kw = dict(cfg=PIXEL_MICRO, steps=8, batch=4, lr=1e-3, log_every=2)
    (tmp_path / "a").mkdir()
    train_pixel_ddpm(tmp_path / "a", **kw)
    (tmp_path / "b").mkdir()
    train_pixel_ddpm(tmp_path / "b", stop_at=4, **kw)
    assert torch.load(tmp_path / "b" / "ddpm.pt", weights_only=True)["step"] == 4
    train_pixel_ddpm(tmp_path / "b", **kw)
    a, b = _weights(tmp_path / "a" / "ddpm.pt"), _weights(tmp_path / "b" / "ddpm.pt")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a stop that restarted the noise stream (the old behaviour) would land elsewhere
    (tmp_path / "c").mkdir()
    train_pixel_ddpm(tmp_path / "c", stop_at=4, **kw)
    st = torch.load(tmp_path / "c" / "ddpm.pt", weights_only=True)
    st["rng"] = torch.Generator().manual_seed(99).get_state()
    torch.save(st, tmp_path / "c" / "ddpm.pt")
    train_pixel_ddpm(tmp_path / "c", **kw)
    c = _weights(tmp_path / "c" / "ddpm.pt")
    assert any(not torch.equal(a[0][k], c[0][k]) for k in a[0])


@pytest.mark.slow
def test_unet_resumed_run_equals_uninterrupted(tmp_path):
    """The same for the text-to-image UNet stage (noise generator and caption RNG checkpointed)."""
    from diffseg_utils.toy import train

    work = tmp_path / "w"
    train.main(["--config", "micro", "--work", str(work), "--out", str(tmp_path / "o"), "--stage", "vae",
                "--vae-steps", "2", "--vae-batch", "2"])
    train.main(["--config", "micro", "--work", str(work), "--out", str(tmp_path / "o"), "--stage", "latents",
                "--num-latents", "16"])
    cfg = train.MICRO
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "latents.pt").write_bytes((work / "latents.pt").read_bytes())
    train.train_unet(tmp_path / "a", cfg, steps=6, batch=4, lr=1e-3, log_every=2)
    train.train_unet(tmp_path / "b", cfg, steps=6, batch=4, lr=1e-3, log_every=2, stop_at=2)
    train.train_unet(tmp_path / "b", cfg, steps=6, batch=4, lr=1e-3, log_every=2)
    a, b = _weights(tmp_path / "a" / "unet.pt"), _weights(tmp_path / "b" / "unet.pt")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the same with the caption's summary hidden in half the captions: resumes exactly, trains differently
    for name in ("c", "e"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "latents.pt").write_bytes((work / "latents.pt").read_bytes())
    train.train_unet(tmp_path / "c", cfg, steps=6, batch=4, lr=1e-3, log_every=2, p_hide=0.5)
    train.train_unet(tmp_path / "e", cfg, steps=6, batch=4, lr=1e-3, log_every=2, stop_at=2, p_hide=0.5)
    train.train_unet(tmp_path / "e", cfg, steps=6, batch=4, lr=1e-3, log_every=2, p_hide=0.5)
    c, e = _weights(tmp_path / "c" / "unet.pt"), _weights(tmp_path / "e" / "unet.pt")
    torch.testing.assert_close(c, e, rtol=0, atol=0)
    assert any(not torch.equal(a[1][k], c[1][k]) for k in a[1])


@pytest.mark.slow
def test_micro_faces_training_exports_and_gates(tmp_path):
    """ddpm -> export (a DDPMPipeline directory) -> gate, on the micro pixel config."""
    from diffusers import DDPMPipeline

    from diffseg_utils.toy import train
    from diffseg_utils.toy.oracle import train as train_oracle

    out, work = tmp_path / "faces", tmp_path / "work"
    train.main(["--world", "faces", "--config", "micro", "--work", str(work), "--out", str(out), "--ddpm-steps", "4",
                "--ddpm-batch", "2"])
    bb = load_backbone(str(out), device="cpu")
    assert bb.kind == "pixel" and bb.resolution == 16
    img = DDPMPipeline.from_pretrained(out)(batch_size=1, num_inference_steps=2, output_type="np",
                                           generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3)
    train_oracle(tmp_path / "oracle", steps=2, batch=2, width=4, eval_every=100, world="faces")
    from diffseg_utils.toy.gates import gate_pixel

    rec = gate_pixel(work, out, train.PIXEL_MICRO, n_probe=2, n_samples=2, oracle_dir=tmp_path / "oracle",
                     timesteps=(50,))
    assert [r["step"] for r in rec["checkpoints"]] == [4]
    assert {"samples_all_found", "probe_mlp", "probe_block"} <= set(rec["checkpoints"][0])
    assert rec["rgbxy"]["block"] == "rgbxy" and rec["rgb"]["block"] == "rgb"


@pytest.mark.slow
def test_micro_mmdit_trains_resumes_exports_and_gates(tmp_path):
    """The toy MM-DiT stages on a micro config: a resumed run equals an uninterrupted one, the export loads
    through StableDiffusion3Pipeline and load_backbone, and our sampler equals the pipeline's."""
    from diffusers import StableDiffusion3Pipeline

    from diffseg_utils.backbones import SD3Backbone
    from diffseg_utils.registry import TOY_SD_DIR
    from diffseg_utils.sampling import generate
    from diffseg_utils.toy import train
    from diffseg_utils.toy.models import SD3_MICRO
    from diffseg_utils.toy.train_sd3 import train_mmdit

    base = ["--model", "sd3", "--config", "micro", "--num-latents", "16", "--mmdit-batch", "4", "--mmdit-steps", "6"]
    work, out = tmp_path / "a", tmp_path / "sd3"
    train.main([*base, "--work", str(work), "--out", str(out)])
    b = tmp_path / "b"
    b.mkdir()
    (b / "latents.pt").write_bytes((work / "latents.pt").read_bytes())
    kw = dict(steps=6, batch=4, lr=1e-3, log_every=2)
    train_mmdit(b, TOY_SD_DIR, SD3_MICRO, stop_at=2, **kw)
    train_mmdit(b, TOY_SD_DIR, SD3_MICRO, **kw)
    a_st, b_st = (torch.load(d / "mmdit.pt", weights_only=True) for d in (work, b))
    torch.testing.assert_close(a_st["ema"], b_st["ema"], rtol=0, atol=0)
    bb = load_backbone(str(out), device="cpu", max_sequence_length=0)
    assert type(bb) is SD3Backbone and bb.resolution == 64 and bb.latent_resolution == 16
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    theirs = pipe("a photo of a star", num_inference_steps=2, guidance_scale=5.0, latents=x, max_sequence_length=0,
                  output_type="latent").images
    ours = generate(bb, ["a photo of a star"], num_steps=2, guidance_scale=5.0, seed=3, return_latents=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    train.main([*base, "--work", str(work), "--out", str(out), "--stage", "gate"])
    rec = json.loads((out / "gates.json").read_text())
    assert [r["step"] for r in rec["checkpoints"]] == [6] and 0 <= rec["checkpoints"][0]["fidelity_all_found"] <= 1
    # a fine-tune that hides the caption's summary: starts from the checkpoint's weights, resumes exactly
    for d in ("c", "e"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "latents.pt").write_bytes((work / "latents.pt").read_bytes())
    ft = dict(kw, p_hide=0.5, init=work / "mmdit.pt", warmup=2)
    train_mmdit(tmp_path / "c", TOY_SD_DIR, SD3_MICRO, **ft)
    train_mmdit(tmp_path / "e", TOY_SD_DIR, SD3_MICRO, stop_at=2, **ft)
    train_mmdit(tmp_path / "e", TOY_SD_DIR, SD3_MICRO, **ft)
    c_st, e_st = (torch.load(tmp_path / d / "mmdit.pt", weights_only=True) for d in ("c", "e"))
    torch.testing.assert_close(c_st["ema"], e_st["ema"], rtol=0, atol=0)
    assert c_st["step"] == 6 and c_st["init_step"] == 6 and c_st["p_hide"] == 0.5
    assert any(not torch.equal(c_st["ema"][k], a_st["ema"][k]) for k in a_st["ema"])


def test_hide_summary_replaces_end_of_text_and_padding_of_flagged_rows():
    from diffseg_utils.toy.train import hide_summary

    ids = torch.tensor([[1, 5, 6, 9, 9], [1, 5, 9, 9, 9], [1, 9, 9, 9, 9]])
    states = torch.arange(30.0).view(3, 5, 2)
    empty = -torch.ones(1, 5, 2)
    out = hide_summary(states, ids, 9, empty, torch.tensor([True, False, True]))
    want = states.clone()
    want[0, 3:], want[2, 1:] = -1, -1
    assert torch.equal(out, want)
