"""Train the tiny Stable Diffusion on the toy world, on CPU, resumably.

    python -m diffseg_utils.toy.train --out data/toy-sd                    # all stages
    python -m diffseg_utils.toy.train --out data/toy-sd --stage unet       # resume one stage

Stages (each checkpoints to ``--work`` and resumes where it stopped):

1. ``vae``:     AutoencoderKL on rendered images (MSE + 0.1 L1 + tiny KL).
2. ``latents``: encode ``--num-latents`` generator images once (posterior mean and std) and
                set the VAE's ``scaling_factor`` so scaled latents have unit variance.
3. ``unet``:    UNet2DConditionModel + CLIP text encoder on the cached latents: epsilon loss
                with Min-SNR-5 weighting, 10% prompt dropout (classifier-free guidance),
                random object order in captions, EMA weights.
4. ``decoder``: optional extra decoder-only VAE training (the encoder, hence the latent
                space the UNet learned, stays fixed).
5. ``export``:  write a diffusers ``StableDiffusionPipeline`` directory with the EMA weights.
6. ``gate``:    measure every UNet checkpoint in ``--work`` (prompt fidelity with the oracle,
                few-shot probe, against an untrained UNet) into ``<out>/gates.json``; rerun
                after more training and only new checkpoints are measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..metrics import psnr

from .models import (MICRO, PIXEL_MICRO, PixelDDPMConfig, ToySDConfig, build_pixel_scheduler, build_pixel_unet,
                     build_scheduler, build_text_encoder, build_unet, build_vae)
from .tokenizer import make_portable, build_tokenizer
from .world import CATEGORIES, caption_for, render


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def vae_psnr(vae, n: int = 64) -> float:
    """Mean reconstruction PSNR (dB, images in [0, 1]) on held-out ``vae_test`` images."""
    x = _to_tensor(render("vae_test", 0, n).images)
    with torch.no_grad():
        r = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return psnr(x, r)


def _save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the checkpoint


def train_vae(work: Path, cfg: ToySDConfig, steps: int, batch: int, lr: float, decoder_only: bool = False,
              log_every: int = 250) -> None:
    """Train (or resume) the VAE; ``decoder_only`` freezes the encoder (latent space stays fixed)."""
    ck = work / ("vae_dec.pt" if decoder_only else "vae.pt")
    vae = build_vae(cfg)
    start = 0
    if decoder_only:
        vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    params = [p for n, p in vae.named_parameters() if not decoder_only or n.startswith(("decoder", "post_quant"))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
    torch.manual_seed(1234 + start)
    sched = lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = tqdm(range(start, steps), desc="vae-decoder" if decoder_only else "vae", initial=start, total=steps)
    offset = 10_000_000 if decoder_only else 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * sched(step)
        x = _to_tensor(render("generator", offset + step * batch, batch).images)
        if decoder_only:
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample()
            kl = torch.zeros(())
        else:
            post = vae.encode(x).latent_dist
            z, kl = post.sample(), post.kl().mean()
        rec = vae.decode(z).sample
        loss = ((rec - x) ** 2).mean() + 0.1 * (rec - x).abs().mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            psnr = vae_psnr(vae)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}")
            _log(work, {"stage": "vae_dec" if decoder_only else "vae", "step": step + 1, "psnr": psnr})
            _save(ck, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)


def warmup_cosine(lr: float, step: int, steps: int, warmup: int, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to ``min_lr`` x ``lr`` at ``steps``."""
    return lr * min(1.0, (step + 1) / warmup) * (
        min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def resume(ck: Path, cfg, model, key: str, opt, g: torch.Generator) -> tuple[dict, int, dict]:
    """Load a training checkpoint written with ``config=cfg.to_dict()``: the model (under ``key``), optimiser and
    noise-generator state; returns ``(ema, step, checkpoint)``. A fresh run (no ``ck``) gets ``(copy, 0, {})``."""
    if not ck.exists():
        return copy.deepcopy(model.state_dict()), 0, {}
    st = torch.load(ck, weights_only=True)
    if st["config"] != cfg.to_dict():
        raise ValueError(f"{ck} was trained with config {st['config']}, not {cfg.to_dict()}; use another --work")
    model.load_state_dict(st[key])
    opt.load_state_dict(st["opt"])
    g.set_state(st["rng"])
    return st["ema"], int(st["step"]), st


def train_step(opt, loss: torch.Tensor, models: dict, ema: dict, step: int, ema_decay: float) -> None:
    """Backward, gradients clipped at norm 1 over all ``models`` together, the optimiser step, then the EMA
    update of each model's floating-point state (decay ``(1 + step) / (10 + step)`` capped at ``ema_decay``).
    ``models`` and ``ema`` share keys: ``ema[key]`` is the EMA state dict of ``models[key]``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for m in models.values() for p in m.parameters()], 1.0)
    opt.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for key, model in models.items():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[key][k].mul_(d).add_(v.detach(), alpha=1 - d)


def _log(work: Path, rec: dict) -> None:
    rec["time"] = time.time()
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def cache_latents(work: Path, cfg: ToySDConfig, n: int, chunk: int = 256, exported: Path | None = None) -> None:
    """Encode n generator images once; store posterior mean/std (fp16) and object classes.

    Uses ``work/vae.pt``, or the exported pipeline's VAE (same encoder) when that is gone.
    """
    out = work / "latents.pt"
    if out.exists() and torch.load(out, weights_only=True)["mean"].shape[0] >= n:
        return
    vae = build_vae(cfg)
    if (work / "vae.pt").exists():
        vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    elif exported is not None and (exported / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(exported, subfolder="vae").state_dict())
    else:
        raise FileNotFoundError(f"no VAE checkpoint in {work} and no exported VAE; run the 'vae' stage first")
    vae.eval()
    means, stds, classes = [], [], np.zeros((n, 3), np.int64)
    for s in tqdm(range(0, n, chunk), desc="encode latents"):
        b = render("generator", s, min(chunk, n - s))
        with torch.no_grad():
            d = vae.encode(_to_tensor(b.images)).latent_dist
        means.append(d.mean.half())
        stds.append(d.std.half())
        for i, c in enumerate(b.classes):
            classes[s + i, : len(c)] = c
    mean = torch.cat(means)
    scaling = float(1.0 / mean.float().std())
    _save(out, mean=mean, std=torch.cat(stds), classes=torch.from_numpy(classes), scaling=scaling)


def _captions(classes: torch.Tensor, rng: np.random.Generator, p_drop: float) -> list[str]:
    caps = []
    for row in classes.tolist():
        names = [CATEGORIES[c - 1] for c in row if c > 0]
        rng.shuffle(names)
        caps.append("" if rng.uniform() < p_drop else caption_for(names))
    return caps


def hide_summary(states: torch.Tensor, ids: torch.Tensor, eos: int, empty_states: torch.Tensor,
                 hide: torch.Tensor) -> torch.Tensor:
    """Replace the *summary* of the captions flagged in ``hide`` by the empty prompt's.

    ``states`` (B, L, D): the text encoder's output for token ids ``ids`` (B, L); ``empty_states`` (1, L, D): the
    empty prompt's; ``hide`` (B,) bool. In a flagged row every position from the first ``eos`` on (end of text,
    padding: a causal encoder lets these see every word) takes the empty prompt's state at that position; the
    word states stay. Trained this way, a denoiser must read the class from the word tokens themselves
    (``docs/experiments/toy_sd_word_binding.py`` measures why the toy SD does not).
    """
    after_text = (ids == eos).int().cumsum(1) > 0  # (B, L): the end-of-text token and what follows it
    return torch.where((after_text & hide[:, None])[..., None], empty_states, states)


def train_unet(work: Path, cfg: ToySDConfig, steps: int, batch: int, lr: float, ema_decay: float = 0.999,
               p_drop: float = 0.1, snr_gamma: float = 5.0, log_every: int = 200, init_from: Path | None = None,
               stop_at: int | None = None, seed: int = 0, p_hide: float = 0.0) -> None:
    """Train (or resume) the UNet and text encoder on cached latents.

    Resumes from ``work/unet.pt`` with every random state (noise generator, caption RNG), so an
    interrupted and resumed run reaches the same weights as one that never stopped; without it,
    from an exported pipeline ``init_from`` (its EMA weights, a fresh optimiser) so training can
    continue on a machine that lost the checkpoints. ``stop_at`` ends the run early at that step
    (checkpointed), as an interruption would. ``p_hide``: the share of captions whose summary is hidden
    (:func:`hide_summary`; the empty prompt encoded by the text encoder being trained, in the same pass).
    """
    data = torch.load(work / "latents.pt", weights_only=True)
    tok = build_tokenizer(work / "tokenizer", model_max_length=cfg.max_tokens)
    torch.manual_seed(seed)  # the initial weights (a resumed run overwrites them from the checkpoint)
    unet = build_unet(cfg)
    text = build_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)
    sched = build_scheduler()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {"unet": copy.deepcopy(unet.state_dict()), "text": copy.deepcopy(text.state_dict())}
    ck = work / "unet.pt"
    start, rng_state = 0, None
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"])
        ema, start = st["ema"], st["step"]
        rng_state = (st["rng"], json.loads(st["np_rng"])) if "rng" in st else None
    elif init_from is not None and (init_from / "unet").is_dir():
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from, subfolder="unet").state_dict())
        text.load_state_dict(CLIPTextModel.from_pretrained(init_from, subfolder="text_encoder").state_dict())
        ema = {"unet": copy.deepcopy(unet.state_dict()), "text": copy.deepcopy(text.state_dict())}
        start = json.loads((init_from / "training_state.json").read_text())["unet_step"]
        print(f"continuing from the exported weights in {init_from} (step {start})")
    g = torch.Generator().manual_seed(4321 + start)
    rng = np.random.default_rng(4321 + start)
    if rng_state is not None:  # continue the very same random streams
        g.set_state(rng_state[0])
        rng.bit_generator.state = rng_state[1]
    abar = sched.alphas_cumprod
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
    n = data["mean"].shape[0]
    bar = tqdm(range(start, steps), desc="unet", initial=start, total=steps)
    run_loss = None
    for step in bar:
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 200)
        idx = torch.randint(0, n, (batch,), generator=g)
        z0 = (data["mean"][idx].float() + data["std"][idx].float() * torch.randn(batch, *data["mean"].shape[1:],
                                                                                 generator=g)) * data["scaling"]
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, eps, t)
        captions = _captions(data["classes"][idx], rng, p_drop)
        ids = tok(captions + [""] * bool(p_hide), padding="max_length", max_length=cfg.max_tokens, truncation=True,
                  return_tensors="pt").input_ids
        states = text(ids)[0]
        if p_hide:  # the empty prompt was encoded in the same pass, as the last row
            hide = torch.from_numpy(rng.random(batch) < p_hide)
            states = hide_summary(states[:-1], ids[:-1], tok.eos_token_id, states[-1:], hide)
        pred = unet(zt, t, encoder_hidden_states=states).sample
        loss = (weight[t] * ((pred - eps) ** 2).mean((1, 2, 3))).mean()
        train_step(opt, loss, {"unet": unet, "text": text}, ema, step, ema_decay)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{run_loss:.4f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _log(work, {"stage": "unet", "step": step + 1, "loss": run_loss})
            _save(ck, unet=unet.state_dict(), text=text.state_dict(), opt=opt.state_dict(), ema=ema, step=step + 1,
                  rng=g.get_state(), np_rng=json.dumps(rng.bit_generator.state))
            if (step + 1) % (log_every * 10) == 0:
                _save(work / f"unet_{step + 1}.pt", ema=ema, step=step + 1)
        if stop_at is not None and step + 1 >= stop_at:
            break


def train_pixel_ddpm(work: Path, cfg: PixelDDPMConfig, steps: int, batch: int, lr: float, ema_decay: float = 0.999,
                     log_every: int = 200, keep_every: int = 1000, min_lr: float = 0.1,
                     stop_at: int | None = None, seed: int = 0) -> None:
    """Train (or resume) the unconditional pixel DDPM on faces rendered on the fly.

    Epsilon loss at uniform t (DDPM's simple loss), AdamW, 200 warm-up steps then a cosine decay
    to ``min_lr`` x ``lr`` at ``steps``, EMA weights. Batch ``s`` is faces
    ``s * batch ...`` of the ``generator`` split; the noise comes from a generator whose state is
    checkpointed, so a resumed run reaches the same weights as an uninterrupted one. ``stop_at``
    ends the run early at that step (checkpointed), as an interruption would.
    """
    from .faces import render_faces

    torch.manual_seed(seed)  # the initial weights (a resumed run overwrites them from the checkpoint)
    unet, sched = build_pixel_unet(cfg), build_pixel_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(2024)
    ck = work / "ddpm.pt"
    ema, start, _ = resume(ck, cfg, unet, "unet", opt, g)
    lr_at = lambda s: warmup_cosine(lr, s, steps, 200, min_lr)  # noqa: E731
    bar = tqdm(range(start, steps), desc="pixel ddpm", initial=start, total=steps)
    run_loss = None
    for step in bar:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        x0 = _to_tensor(render_faces("generator", step * batch, batch, size=cfg.image_size).images)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(unet(sched.add_noise(x0, eps, t), t).sample, eps)
        train_step(opt, loss, {"unet": unet}, {"unet": ema}, step, ema_decay)
        if (step + 1) % 20 == 0 or step + 1 == steps:  # a host sync every 20 steps, not every step
            run_loss = loss.item() if run_loss is None else 0.8 * run_loss + 0.2 * loss.item()
            bar.set_postfix(loss=f"{run_loss:.4f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _log(work, {"stage": "ddpm", "step": step + 1, "loss": run_loss, "lr": lr_at(step)})
            _save(ck, unet=unet.state_dict(), opt=opt.state_dict(), ema=ema, step=step + 1, rng=g.get_state(),
                  config=cfg.to_dict())
            if (step + 1) % keep_every == 0:
                _save(work / f"ddpm_{step + 1}.pt", ema=ema, step=step + 1, config=cfg.to_dict())
        if stop_at is not None and step + 1 >= stop_at:
            break


def export_pixel(work: Path, out: Path, cfg: PixelDDPMConfig, ckpt: Path | None = None) -> None:
    """Write the diffusers ``DDPMPipeline`` directory (UNet2DModel with the EMA weights + DDPMScheduler)."""
    from diffusers import DDPMPipeline

    unet = build_pixel_unet(cfg)
    st = torch.load(ckpt or work / "ddpm.pt", weights_only=True)
    unet.load_state_dict(st["ema"])
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=build_pixel_scheduler()).save_pretrained(str(out), safe_serialization=True)
    (out / "training_state.json").write_text(json.dumps({"step": int(st["step"]), "world": "faces",
                                                         "config": cfg.to_dict()}, indent=1))


def export(work: Path, out: Path, cfg: ToySDConfig, unet_ckpt: Path | None = None) -> None:
    """Write the StableDiffusionPipeline directory (EMA weights; decoder-finetuned VAE if present)."""
    from diffusers import StableDiffusionPipeline

    tok = build_tokenizer(work / "tokenizer", model_max_length=cfg.max_tokens)
    vae = build_vae(cfg)
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    if (work / "vae_dec.pt").exists():
        vae.load_state_dict(torch.load(work / "vae_dec.pt", weights_only=True)["model"])
    vae.register_to_config(scaling_factor=torch.load(work / "latents.pt", weights_only=True)["scaling"])
    unet, text = build_unet(cfg), build_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)
    st = torch.load(unet_ckpt or work / "unet.pt", weights_only=True)
    unet.load_state_dict(st["ema"]["unet"])
    text.load_state_dict(st["ema"]["text"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    make_portable(out)  # transformers 4 reads it too
    (out / "training_state.json").write_text(json.dumps({"unet_step": st["step"], "config": cfg.to_dict()}, indent=1))


def gate(work: Path, out: Path, *, n_fidelity: int = 32, n_probe: int = 20, num_steps: int = 20,
         guidance_scale: float = 5.0, seed: int = 0, oracle_dir: Path | None = None, prefix: str = "unet",
         options: dict | None = None) -> dict:
    """Measure every ``<prefix>_<step>.pt`` and ``<prefix>.pt`` in ``work`` on the pipeline in ``out``
    (``prefix`` "unet": the toy SD; "mmdit": the toy MM-DiT, loaded with ``options``).

    Per checkpoint: prompt fidelity (``n_fidelity`` generations, the oracle) and the few-shot
    probe of notebook 00 (:func:`~diffseg_utils.toy.quality.fewshot_probe`); once: the same probe
    on an untrained UNet (at its own best place) and on raw RGB. Results accumulate in ``out/gates.json``.
    """
    from ..loading import load_backbone, untrained_like
    from ..registry import DATA_DIR
    from .oracle import OracleSegmenter
    from .gates import open_record, unmeasured_checkpoints
    from .quality import GATE_START, backbone_from_checkpoint, fewshot_probe, fewshot_probe_rgb, prompt_fidelity

    protocol = {"n_fidelity": n_fidelity, "n_probe": n_probe, "num_steps": num_steps, "guidance": guidance_scale, "seed": seed,
                "place": "best ridge probe on validation images", "scored_on": f"validation images (fewshot_test {GATE_START}+)"}
    path = out / "gates.json"
    rec = open_record(path, protocol)
    base = load_backbone(str(out), device="cpu", **(options or {}))
    oracle = OracleSegmenter.load(oracle_dir or DATA_DIR / "oracle")
    if "untrained" not in rec:
        rec["untrained"] = fewshot_probe(untrained_like(base, seed=seed), n_train=n_probe, n_test=n_probe, n_val=n_probe,
                                          seed=seed, test_start=GATE_START).as_dict()
        rec["rgb"] = fewshot_probe_rgb(n_train=n_probe, n_test=n_probe, seed=seed, test_start=GATE_START).as_dict()
    for step, ckpt in tqdm(unmeasured_checkpoints(work, prefix, rec).items(), desc="gate"):
        t0 = time.time()
        bb = backbone_from_checkpoint(base, ckpt)
        fid = prompt_fidelity(bb, oracle, n=n_fidelity, guidance_scale=guidance_scale, num_steps=num_steps, seed=seed)
        probe = fewshot_probe(bb, n_train=n_probe, n_test=n_probe, n_val=n_probe, seed=seed, test_start=GATE_START).as_dict()
        rec["checkpoints"].append({"step": step, "fidelity_all_found": fid["all_found"],
                                   "object_hit_rate": fid["object_hit_rate"], **{f"probe_{k}": v for k, v in probe.items()},
                                   "seconds": round(time.time() - t0, 1)})
        rec["checkpoints"].sort(key=lambda r: r["step"])
        path.write_text(json.dumps(rec, indent=1))
        _log(work, {"stage": "gate", "step": step, "fidelity": fid["all_found"], "probe_mlp": probe["mlp"]})
    path.write_text(json.dumps(rec, indent=1))
    return rec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/toy-sd"), help="pipeline directory to write")
    p.add_argument("--work", type=Path, default=Path("~/.cache/diffseg/toy-train").expanduser(),
                   help="checkpoints and cached latents (kept out of git)")
    p.add_argument("--world", default="shapes", choices=["shapes", "faces"],
                   help="shapes: the text-to-image latent SD; faces: the unconditional pixel DDPM (stages ddpm, export, gate)")
    p.add_argument("--model", default="sd", choices=["sd", "sd3"],
                   help="shapes world: sd = the tiny SD (UNet); sd3 = the toy MM-DiT on the toy SD's VAE and text encoder")
    p.add_argument("--stage", default="all",
                   choices=["all", "vae", "latents", "unet", "decoder", "ddpm", "mmdit", "export", "gate"])
    p.add_argument("--mmdit-steps", type=int, default=16000)
    p.add_argument("--mmdit-batch", type=int, default=32)
    p.add_argument("--mmdit-lr", type=float, default=1e-3)
    p.add_argument("--hide-summary", type=float, default=0.0,
                   help="share of captions whose end-of-text/padding states (and pooled embedding) are the empty prompt's")
    p.add_argument("--mmdit-init", type=Path, default=None,
                   help="fine-tune: start a fresh --work from this training checkpoint's weights and optimiser state")
    p.add_argument("--mmdit-warmup", type=int, default=300)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="--model sd3 --stage export: the kept checkpoint to export (default <work>/mmdit.pt)")
    p.add_argument("--stop-at", type=int, default=None, help="end training at this step (checkpointed), to resume later")
    p.add_argument("--config", default="default", choices=["default", "micro"])
    p.add_argument("--ddpm-steps", type=int, default=9000)
    p.add_argument("--ddpm-batch", type=int, default=32)
    p.add_argument("--ddpm-lr", type=float, default=1e-3)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--decoder-steps", type=int, default=0)
    p.add_argument("--num-latents", type=int, default=60_000)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--gate-fidelity", type=int, default=32, help="generations per checkpoint for the fidelity gate")
    p.add_argument("--gate-probe", type=int, default=20, help="few-shot train (and test) images for the probe gate")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy-sd", type=Path, default=None,
                   help="--model sd3: the toy SD pipeline whose VAE and text encoder it reuses (default data/toy-sd)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    if a.world == "faces":
        pcfg = PIXEL_MICRO if a.config == "micro" else PixelDDPMConfig()
        if a.stage in ("all", "ddpm"):
            train_pixel_ddpm(a.work, pcfg, a.ddpm_steps, a.ddpm_batch, a.ddpm_lr, seed=a.seed)
        if a.stage in ("all", "export"):
            export_pixel(a.work, a.out, pcfg)
        if a.stage == "gate":
            from .gates import gate_pixel

            gate_pixel(a.work, a.out, pcfg, n_probe=a.gate_probe, seed=a.seed)
        print(f"done; CPU time of this run: {time.process_time() - t0:.0f} s")
        return
    if a.model == "sd3":
        from .models import SD3_MICRO, ToySD3Config
        from .train_sd3 import run

        from ..registry import TOY_SD_DIR

        run(a.stage, a.work, a.out, a.toy_sd or TOY_SD_DIR, SD3_MICRO if a.config == "micro" else ToySD3Config(),
            steps=a.mmdit_steps, batch=a.mmdit_batch, lr=a.mmdit_lr, num_latents=a.num_latents, stop_at=a.stop_at,
            seed=a.seed, p_hide=a.hide_summary, init=a.mmdit_init, warmup=a.mmdit_warmup,
            checkpoint=a.checkpoint)
        return
    cfg = MICRO if a.config == "micro" else ToySDConfig()
    if a.stage in ("all", "vae"):
        train_vae(a.work, cfg, a.vae_steps, a.vae_batch, a.vae_lr)
    if a.stage in ("all", "latents"):
        cache_latents(a.work, cfg, a.num_latents, exported=a.out)
    if a.stage in ("all", "unet"):
        train_unet(a.work, cfg, a.unet_steps, a.unet_batch, a.unet_lr, init_from=a.out, seed=a.seed,
                   p_hide=a.hide_summary)
    if a.stage in ("all", "decoder") and a.decoder_steps:
        train_vae(a.work, cfg, a.decoder_steps, a.vae_batch, a.vae_lr / 2, decoder_only=True)
    if a.stage in ("all", "export"):
        export(a.work, a.out, cfg)
    if a.stage == "gate":
        gate(a.work, a.out, n_fidelity=a.gate_fidelity, n_probe=a.gate_probe, seed=a.seed)
    print(f"done; CPU time of this run: {time.process_time() - t0:.0f} s")


if __name__ == "__main__":
    main()
