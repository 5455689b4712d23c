"""Train the toy MM-DiT (``data/toy-sd3``): an SD3-architecture pipeline on the shapes world, on CPU.

    python -m diffseg_utils.toy.train --model sd3 --out data/toy-sd3                  # all stages
    python -m diffseg_utils.toy.train --model sd3 --out data/toy-sd3 --stage mmdit    # resume training

It reuses the toy SD's VAE (frozen; its latent space and scaling factor) and its text encoder
(frozen, in both of SD3's CLIP slots, no T5), and trains only an ``SD3Transformer2DModel`` with
SD3's rectified-flow objective: ``x_s = (1 - s) x_0 + s e``, predict ``e - x_0``, the noise level
``s`` drawn logit-normal (mean 0, std 1) as in the SD3 paper, 10% empty prompts for
classifier-free guidance, random object order in captions, EMA weights. With ``p_hide`` > 0 a
caption's *summary* (the end-of-text and padding states, which the causal text encoder lets see
every word, and the pooled embedding, their copy) is replaced by the empty prompt's in that share
of the training captions, so the transformer must read the class from the word tokens themselves
(``docs/experiments/toy_sd_word_binding.py`` measures why the toy SD does not). The conditioning is
computed by ``StableDiffusion3Pipeline.encode_prompt`` itself, so training sees exactly what the
pipeline feeds the transformer at inference. Stages:

1. ``latents``: encode the generator images with the toy VAE once (shared with the toy SD's
   training; see :func:`diffseg_utils.toy.train.cache_latents`).
2. ``mmdit``:   train (resumable with every random state; ``mmdit_<step>.pt`` kept for the gates).
3. ``export``:  write a ``StableDiffusion3Pipeline`` directory with the EMA weights.
4. ``gate``:    prompt fidelity of every kept checkpoint (the shapes oracle), into ``<out>/gates.json``.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import ToySD3Config, build_flow_scheduler, build_sd3_transformer
from .tokenizer import make_portable


def toy_text_encoder(toy_sd: Path):
    """The toy SD's frozen CLIP text encoder as SD3's ``CLIPTextModelWithProjection`` (identity projection)."""
    from transformers import CLIPTextModelWithProjection

    te = CLIPTextModelWithProjection.from_pretrained(toy_sd, subfolder="text_encoder")
    with torch.no_grad():
        te.text_projection.weight.copy_(torch.eye(te.text_projection.weight.shape[0]))
    return te.requires_grad_(False).eval()


def build_pipeline(toy_sd: Path, cfg: ToySD3Config, transformer=None):
    """A ``StableDiffusion3Pipeline`` over the toy SD's VAE and text encoder (in both CLIP slots)."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(toy_sd, subfolder="vae").requires_grad_(False).eval()
    vae.register_to_config(shift_factor=0.0)  # SD3's decode reads it; the toy VAE's latents are centred
    te = toy_text_encoder(toy_sd)
    tok = CLIPTokenizer.from_pretrained(toy_sd, subfolder="tokenizer")
    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else build_sd3_transformer(cfg),
        scheduler=build_flow_scheduler(), vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=copy.deepcopy(te),
        tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def _captions(classes: torch.Tensor, rng: np.random.Generator, p_drop: float) -> list[str]:
    from .train import _captions as captions

    return captions(classes, rng, p_drop)


def train_mmdit(work: Path, toy_sd: Path, cfg: ToySD3Config, steps: int, batch: int, lr: float, *,
                ema_decay: float = 0.999, p_drop: float = 0.1, p_hide: float = 0.0, init: Path | None = None,
                warmup: int = 300, min_lr: float = 0.1, log_every: int = 200, keep_every: int = 2000,
                stop_at: int | None = None, seed: int = 0) -> None:
    """Train (or resume) the MM-DiT on the cached latents (``work/latents.pt``).

    AdamW at ``lr`` with ``warmup`` steps then a cosine decay to ``min_lr`` x ``lr`` at ``steps``;
    gradients clipped at 1. Resumes from ``work/mmdit.pt`` with every random state, so an
    interrupted run reaches the same weights as one that never stopped. A fresh run starts from
    random weights, or from the weights, EMA and optimiser state of the training checkpoint ``init``
    (a fine-tune: the step count and the schedule start at 0; checkpoints record ``init_step``, the steps
    before it, so that gates and the export count steps from the very start). ``p_hide``: the share of non-empty
    captions whose summary is hidden (:func:`~diffseg_utils.toy.train.hide_summary`; the pooled embedding too).
    """
    from .train import _log, _save, hide_summary, resume, train_step, warmup_cosine

    data = torch.load(work / "latents.pt", weights_only=True)
    torch.manual_seed(seed)
    pipe = build_pipeline(toy_sd, cfg)
    model = pipe.transformer.train()
    scaling = float(pipe.vae.config.scaling_factor)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ck = work / "mmdit.pt"
    g = torch.Generator().manual_seed(5678)
    rng = np.random.default_rng(5678)
    if not ck.exists() and init is not None:
        st = torch.load(init, weights_only=True)
        if st["config"] != cfg.to_dict():
            raise ValueError(f"--init {init} was trained with config {st['config']}, not {cfg.to_dict()}")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema, start, init_step, st = st["ema"], 0, int(st["step"]) + int(st.get("init_step", 0)), {}
    else:
        ema, start, st = resume(ck, cfg, model, "model", opt, g)
        init_step = int(st.get("init_step", 0))
    if p_hide:
        empty_cond, _, empty_pooled, _ = pipe.encode_prompt([""], prompt_2=None, prompt_3=None, device="cpu",
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=cfg.max_sequence_length)
    if st:
        rng.bit_generator.state = json.loads(st["np_rng"])  # the caption stream too
    lr_at = lambda s: warmup_cosine(lr, s, steps, warmup, min_lr)  # noqa: E731
    n = data["mean"].shape[0]
    bar = tqdm(range(start, steps), desc="mmdit", initial=start, total=steps)
    run_loss = None
    for step in bar:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = (data["mean"][idx].float() + data["std"][idx].float()
              * torch.randn(batch, *data["mean"].shape[1:], generator=g)) * scaling
        s = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal noise level in (0, 1)
        e = torch.randn(x0.shape, generator=g)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * e
        captions = _captions(data["classes"][idx], rng, p_drop)
        with torch.no_grad():
            cond, _, pooled, _ = pipe.encode_prompt(
                captions, prompt_2=None, prompt_3=None, device="cpu",
                do_classifier_free_guidance=False, max_sequence_length=cfg.max_sequence_length)
        if p_hide:
            ids = pipe.tokenizer(captions, padding="max_length", max_length=cond.shape[1], truncation=True,
                                 return_tensors="pt").input_ids
            hide = torch.from_numpy(rng.random(batch) < p_hide)
            cond = hide_summary(cond, ids, pipe.tokenizer.eos_token_id, empty_cond, hide)
            pooled = torch.where(hide[:, None], empty_pooled, pooled)  # the pooled vector is the end-of-text state
        pred = model(xs, encoder_hidden_states=cond, pooled_projections=pooled, timestep=s * 1000).sample
        loss = F.mse_loss(pred, e - x0)
        train_step(opt, loss, {"model": model}, {"model": ema}, step, ema_decay)
        if (step + 1) % 20 == 0 or step + 1 == steps:  # a host sync every 20 steps, not every step
            run_loss = loss.item() if run_loss is None else 0.8 * run_loss + 0.2 * loss.item()
            bar.set_postfix(loss=f"{run_loss:.4f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _log(work, {"stage": "mmdit", "step": step + 1, "loss": run_loss, "lr": lr_at(step)})
            _save(ck, model=model.state_dict(), opt=opt.state_dict(), ema=ema, step=step + 1, rng=g.get_state(),
                  np_rng=json.dumps(rng.bit_generator.state), config=cfg.to_dict(), init_step=init_step, p_hide=p_hide)
            if (step + 1) % keep_every == 0:
                _save(work / f"mmdit_{step + 1}.pt", ema=ema, step=step + 1, config=cfg.to_dict(), init_step=init_step,
                      p_hide=p_hide)
        if stop_at is not None and step + 1 >= stop_at:
            break


def export_sd3(work: Path, out: Path, toy_sd: Path, cfg: ToySD3Config, ckpt: Path | None = None) -> None:
    """Write the ``StableDiffusion3Pipeline`` directory (EMA weights of ``ckpt``, default ``work/mmdit.pt``)."""
    st = torch.load(ckpt or work / "mmdit.pt", weights_only=True)
    pipe = build_pipeline(toy_sd, cfg)
    pipe.transformer.load_state_dict(st["ema"])
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    make_portable(out)  # transformers 4 reads it too
    state = {"step": int(st["step"]) + int(st.get("init_step", 0)), "world": "shapes", "config": cfg.to_dict()}
    if st.get("init_step"):  # a fine-tune: its own steps after the run it started from
        state["fine_tune"] = {"from_step": int(st["init_step"]), "steps": int(st["step"]),
                              "hide_summary": float(st.get("p_hide", 0.0))}
    (out / "training_state.json").write_text(json.dumps(state, indent=1))


def run(stage: str, work: Path, out: Path, toy_sd: Path, cfg: ToySD3Config, *, steps: int, batch: int, lr: float,
        num_latents: int, stop_at: int | None = None, seed: int = 0, p_hide: float = 0.0, init: Path | None = None,
        warmup: int = 300, checkpoint: Path | None = None) -> None:
    """The ``--model sd3`` stages of ``python -m diffseg_utils.toy.train``."""
    from .models import ToySDConfig
    from .train import cache_latents

    t0 = time.process_time()
    if stage in ("all", "latents"):
        cache_latents(work, ToySDConfig(), num_latents, exported=toy_sd)
    if stage in ("all", "mmdit"):
        train_mmdit(work, toy_sd, cfg, steps, batch, lr, stop_at=stop_at, seed=seed, p_hide=p_hide, init=init,
                    warmup=warmup)
    if stage in ("all", "export"):
        export_sd3(work, out, toy_sd, cfg, ckpt=checkpoint)
    if stage == "gate":
        from .train import gate

        gate(work, out, seed=seed, prefix="mmdit", options={"max_sequence_length": cfg.max_sequence_length})
    print(f"done; CPU time of this run: {time.process_time() - t0:.0f} s")
