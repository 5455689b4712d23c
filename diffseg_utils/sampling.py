"""Text-to-image sampling with DDIM and classifier-free guidance on any :class:`Backbone`.

Our own short loop (not the diffusers pipeline) so methods can see every UNet call: a
``callback(step, t, x_t, model_output)`` runs after each denoising step, and hooks installed around
:func:`generate` see the same passes (conditional and unconditional halves batched together).
:func:`generate` steps with the scheduler's own ``step``; :func:`ddim_step` is the same DDIM
update between any two timesteps (EmerDiff starts from a ``t_m`` off the inference grid), for every
``prediction_type`` the diffusers schedulers have (``epsilon``, ``v_prediction``, ``sample``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .backbones import Backbone
from .inputs import renamed_arguments


@torch.no_grad()
@renamed_arguments("guidance")
def generate(
    backbone: Backbone,
    prompts: Sequence[str] | int,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int | Sequence[int] = 0,
    eta: float = 0.0,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    return_latents: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt; returns ``(N, 3, R, R)`` in [-1, 1] (or latents).

    prompts:  text prompts (conditional backbones) or a count (unconditional ones).
    guidance_scale: classifier-free guidance scale; 1 disables it (no unconditional pass).
    seed:     one seed for the batch, or one per image (independent of batching).
    callback: ``callback(step, t, x_prev, model_output)`` after each step; ``model_output`` is the
              guided UNet output in the scheduler's ``prediction_type`` (epsilon, v or x0).
    """
    n = prompts if isinstance(prompts, int) else len(prompts)
    shape = (backbone.latent_channels, backbone.latent_resolution, backbone.latent_resolution)
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x.to(backbone.device, backbone.dtype)
    sched = backbone.ddim_scheduler()
    sched.set_timesteps(num_steps, device=backbone.device)
    cond = None
    use_cfg = backbone.is_conditional and guidance_scale != 1.0
    if backbone.is_conditional:
        if isinstance(prompts, int):
            prompts = [""] * n
        cond = backbone.encode_prompt(list(prompts))
        if use_cfg:
            cond = torch.cat([backbone.empty_prompt(n), cond])
    g = torch.Generator(device="cpu").manual_seed(seeds[0])
    timesteps = sched.timesteps.tolist()  # one host copy here, not a device sync per step
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        xin = torch.cat([x, x]) if use_cfg else x
        out = backbone.unet_forward(xin, t, cond)   # epsilon, v or x0: sched.step converts
        if use_cfg:
            o_u, o_c = out.chunk(2)
            out = o_u + guidance_scale * (o_c - o_u)
        x = sched.step(out, t, x, eta=eta, generator=g if eta > 0 else None).prev_sample
        if callback is not None:
            callback(i, t, x, out)
    return x if return_latents else backbone.decode(x).clamp(-1, 1)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_step(sched, model_output: torch.Tensor, t: int, t_prev: int | None, x: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) of ``x`` from timestep ``t`` to ``t_prev``.

    The update of diffusers' ``DDIMScheduler.step`` (same ``alphas_cumprod``, same x0 / epsilon
    from ``config.prediction_type``, same ``clip_sample``), but between any two timesteps:
    ``t_prev=None`` steps to the clean sample (alpha = 1, i.e. the x0 prediction).

    model_output, x: (B, C, H, W), any float dtype (the update runs in float32, returned in x's
    dtype). t, t_prev: Python ints. Coefficients are Python floats: no device transfer, no sync.
    """
    cfg = sched.config
    ptype = cfg.prediction_type
    if ptype not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {ptype!r}: DDIM supports {PREDICTION_TYPES}")
    if getattr(cfg, "thresholding", False):
        raise ValueError("the scheduler uses dynamic thresholding, which ddim_step does not implement; "
                         "use a scheduler config with thresholding=False")
    a_t = sched.alphas_cumprod[t]
    a_p = sched.alphas_cumprod[t_prev] if t_prev is not None else torch.ones((), dtype=a_t.dtype)
    # the scheduler's float32 arithmetic, read out as Python scalars
    sa, sb = float(a_t ** 0.5), float((1 - a_t) ** 0.5)
    pa, pb = float(a_p ** 0.5), float((1 - a_p) ** 0.5)
    out, xs = model_output.float(), x.float()
    if ptype == "epsilon":
        x0, eps = (xs - sb * out) / sa, out
    elif ptype == "sample":
        x0 = out
        eps = (xs - sa * x0) / sb
    else:  # v_prediction: v = sqrt(a) eps - sqrt(1 - a) x0
        x0, eps = sa * xs - sb * out, sa * out + sb * xs
    if getattr(cfg, "clip_sample", False):
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return (pa * x0 + pb * eps).to(x.dtype)
