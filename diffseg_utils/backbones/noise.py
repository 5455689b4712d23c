"""The two forward processes the diffusers pipelines ship, behind one small interface.

A backbone's ``t`` is always the value its denoiser is conditioned on, in ``[0, T)`` with
``T = num_train_timesteps`` (1000 for every shipped family), and larger ``t`` is noisier:

* :class:`DDPMNoise` (SD 1.x/2.x, SDXL, PixArt, pixel DDPMs / ADM): integer ``t`` in ``[0, T)``,
  ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) e`` with the scheduler's own ``abar``.
* :class:`FlowNoise` (SD3 / SD3.5, Flux): rectified flow, ``x_t = (1 - s) x_0 + s e`` with
  ``s = t / T``, ``t`` in ``[0, T]``; ``t`` may be fractional (the sampling grid's timesteps are). A scheduler's
  ``shift`` only changes which ``s`` a sampling schedule visits, not what ``t`` means.

So "t = 250" is the same *index* in both, not the same signal-to-noise ratio: the SNR is
``abar / (1 - abar)`` for DDPM and ``((1 - s) / s)^2`` for flow; :meth:`snr` gives it.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DDPMNoise:
    """DDPM / DDIM noising and deterministic DDIM steps with a diffusers DDPM-family scheduler."""

    timestep_dtype = torch.long

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.T = int(scheduler.config.num_train_timesteps)
        self.max_t = self.T - 1

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t``; coefficients in float32 whatever ``x0``'s dtype (in bfloat16 ``abar_1`` rounds to 1)."""
        if x0.dtype == torch.float32:
            return self.scheduler.add_noise(x0, noise.to(x0), t)
        return self.scheduler.add_noise(x0.float(), noise.float(), t).to(x0.dtype)

    def snr(self, t: int) -> float:
        a = float(self.scheduler.alphas_cumprod[int(t)])
        return a / (1 - a)

    def sampler(self, num_steps: int, device: torch.device, **_):
        """A DDIM scheduler on this schedule, with ``num_steps`` timesteps set."""
        from diffusers import DDIMScheduler

        s = DDIMScheduler.from_config(self.scheduler.config)
        s.set_timesteps(num_steps, device=device)
        return s

    def step(self, model_output: torch.Tensor, t: float, t_prev: float | None, x: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step (eta = 0) of ``x`` from ``t`` to ``t_prev`` (None: to the clean sample).

        The update of ``DDIMScheduler.step`` (same ``alphas_cumprod``, the scheduler's
        ``prediction_type`` and ``clip_sample``) between any two timesteps. Runs in float32,
        returns ``x``'s dtype; coefficients are Python floats (no device sync).
        """
        cfg = self.scheduler.config
        ptype = cfg.prediction_type
        if ptype not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {ptype!r}: DDIM supports {PREDICTION_TYPES}")
        if getattr(cfg, "thresholding", False):
            raise ValueError("the scheduler uses dynamic thresholding, which this DDIM step does not implement; "
                             "use a scheduler config with thresholding=False")
        abar = self.scheduler.alphas_cumprod
        a_t = abar[int(t)]
        a_p = abar[int(t_prev)] if t_prev is not None else torch.ones((), dtype=a_t.dtype)
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


class FlowNoise:
    """Rectified-flow noising and Euler steps (``FlowMatchEulerDiscreteScheduler``); the model predicts ``e - x_0``."""

    timestep_dtype = torch.float32

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.T = int(scheduler.config.num_train_timesteps)
        self.max_t = self.T  # s = 1, pure noise: where sampling starts

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        s = (t.float() / self.T).view(-1, *([1] * (x0.ndim - 1)))
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def snr(self, t: float) -> float:
        s = float(t) / self.T
        return ((1 - s) / s) ** 2 if s > 0 else float("inf")

    def sampler(self, num_steps: int, device: torch.device, *, mu: float | None = None):
        """A copy of the backbone's flow scheduler with ``num_steps`` timesteps set (``mu``: Flux's resolution shift)."""
        s = type(self.scheduler).from_config(self.scheduler.config)
        s.set_timesteps(num_steps, device=device, **({"mu": mu} if mu is not None else {}))
        return s

    def step(self, model_output: torch.Tensor, t: float, t_prev: float | None, x: torch.Tensor) -> torch.Tensor:
        """One Euler step ``x + (s_prev - s) v`` from ``t`` to ``t_prev`` (None: to the clean sample, ``s = 0``)."""
        ds = ((float(t_prev) if t_prev is not None else 0.0) - float(t)) / self.T
        return (x.float() + ds * model_output.float()).to(x.dtype)
