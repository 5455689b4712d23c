"""Text-to-image sampling with classifier-free guidance on any :class:`Backbone`.

Our own short loop (not the diffusers pipeline) so methods can see every denoiser call: a
``callback(step, t, x_t, model_output)`` runs after each denoising step, and hooks installed around
:func:`generate` see the same passes (conditional and unconditional halves batched together).
It steps with ``backbone.sampler(num_steps)``: DDIM on DDPM-family schedules, the family's flow
scheduler on flow matching (SD3, Flux). ``backbone.step`` is the same deterministic update between
any two timesteps (EmerDiff starts from a ``t_m`` off the inference grid).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .backbones import Backbone, Conditioning


@torch.no_grad()
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
              guided denoiser output (epsilon, v or x0 as the scheduler's ``prediction_type``; the
              velocity on flow matching).
    """
    n = prompts if isinstance(prompts, int) else len(prompts)
    shape = (backbone.latent_channels, backbone.latent_resolution, backbone.latent_resolution)
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x.to(backbone.device, backbone.dtype)
    sched = backbone.sampler(num_steps)
    if eta > 0 and "eta" not in inspect.signature(sched.step).parameters:
        raise ValueError(f"eta={eta} adds DDIM noise, but {backbone.name!r} samples with {type(sched).__name__} "
                         "(flow matching), which is deterministic: use eta=0")
    cond = None
    use_cfg = backbone.is_conditional and guidance_scale != 1.0
    if backbone.is_conditional:
        if isinstance(prompts, int):
            prompts = [""] * n
        cond = backbone.encode_prompt(list(prompts))
        if use_cfg:
            cond = Conditioning.cat([backbone.empty_prompt(n), cond])
    g = torch.Generator(device="cpu").manual_seed(seeds[0])
    timesteps = sched.timesteps.tolist()  # one host copy here, not a device sync per step
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        xin = torch.cat([x, x]) if use_cfg else x
        out = backbone.predict(xin, t, cond)   # epsilon, v, x0 or flow velocity: sched.step converts
        if use_cfg:
            o_u, o_c = out.chunk(2)
            out = o_u + guidance_scale * (o_c - o_u)
        x = sched.step(out, t, x, **({"eta": eta, "generator": g} if eta > 0 else {})).prev_sample
        if callback is not None:
            callback(i, t, x, out)
    return x if return_latents else backbone.decode(x).clamp(-1, 1)
