"""Text-to-image sampling with DDIM and classifier-free guidance on any :class:`Backbone`.

Our own short loop (not the diffusers pipeline) so methods can see every UNet call: a
``callback(step, t, x_t, eps)`` runs after each denoising step, and hooks installed around
:func:`generate` see the same passes (conditional and unconditional halves batched together).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .backbones import Backbone


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: Sequence[str] | int,
    *,
    num_steps: int = 50,
    guidance: float = 7.5,
    seed: int | Sequence[int] = 0,
    eta: float = 0.0,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    return_latents: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt; returns ``(N, 3, R, R)`` in [-1, 1] (or latents).

    prompts:  text prompts (conditional backbones) or a count (unconditional ones).
    guidance: classifier-free guidance scale; 1 disables it (no unconditional pass).
    seed:     one seed for the batch, or one per image (independent of batching).
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
    use_cfg = backbone.is_conditional and guidance != 1.0
    if backbone.is_conditional:
        if isinstance(prompts, int):
            prompts = [""] * n
        cond = backbone.encode_prompt(list(prompts))
        if use_cfg:
            cond = torch.cat([backbone.empty_prompt(n), cond])
    g = torch.Generator(device="cpu").manual_seed(seeds[0])
    for i, t in enumerate(tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False)):
        xin = torch.cat([x, x]) if use_cfg else x
        eps = backbone.unet_forward(xin, int(t), cond)
        if use_cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = sched.step(eps, t, x, eta=eta, generator=g if eta > 0 else None).prev_sample
        if callback is not None:
            callback(i, int(t), x, eps)
    return x if return_latents else backbone.decode(x).clamp(-1, 1)
