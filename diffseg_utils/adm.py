"""openai guided-diffusion ADM checkpoints as diffusers ``UNet2DModel`` s (our own converter).

DDPM-Seg (Baranchuk et al., 2022) takes its features from ADM UNets stored as plain PyTorch
state dicts. This module rebuilds such a UNet as a diffusers ``UNet2DModel`` with the same
weights, so every tool of this repo (hooks, :func:`~diffseg_utils.backbones.adm_blocks`,
feature extraction) works on it unchanged:

>>> unet, scheduler = load_adm_checkpoint("checkpoints/ddpm/ffhq.pt")      # DDPM-Seg's flags
>>> bb = load_backbone("checkpoints/ddpm/ffhq.pt")                         # a pixel Backbone on it
>>> adm_blocks(bb.denoiser, [5, 6, 7, 8, 12])   # 1024 + 512 + 512 + 512 + 256 = 2816 channels per t

Supported checkpoints (all share one architecture, DDPM-Seg's ``MODEL_FLAGS`` in
``scripts/ddpm/train_interpreter.sh``): ``attention_resolutions 32,16,8``, ``class_cond False``,
``diffusion_steps 1000``, ``dropout 0.1``, ``image_size 256``, ``learn_sigma True``,
``noise_schedule linear``, ``num_channels 256``, ``num_head_channels 64``, ``num_res_blocks 2``,
``resblock_updown True``, ``use_fp16 True``, ``use_scale_shift_norm True`` (552.8 M parameters,
channel multipliers 1, 1, 2, 2, 4, 4):

* ``lsun_bedroom.pt``, ``lsun_cat.pt``, ``lsun_horse.pt`` (openai's LSUN models, which DDPM-Seg
  downloads), ``lsun_horse_nodropout.pt``, openai's ``256x256_diffusion_uncond.pt``;
* DDPM-Seg's own ``ffhq.pt``.

Presets of these names are in :data:`ADM_PRESETS`; with ``flags=None`` the preset named like the
file is used, else DDPM-Seg's flags. Other guided-diffusion flag sets convert too when diffusers can
express them: any ``channel_mult`` starting with 1, ``resblock_updown`` on or off,
``use_scale_shift_norm`` on or off, ``learn_sigma``, ``class_cond``, ``use_new_attention_order``, and
a fixed head width (``num_head_channels``) or a fixed head count giving the same width at every
attention layer. ``use_fp16`` is ignored (the dtype is the caller's choice), ``dropout`` only
matters in training. Refused with a ValueError naming the flag: ``channel_mult`` not starting with
1 (the 512² models), head counts that give different head widths per layer,
``rescale_timesteps`` with ``diffusion_steps`` other than 1000.

Mapping (ADM -> diffusers): ``input_blocks`` -> ``conv_in`` and ``down_blocks[l]`` (resnets,
attentions, downsampler), ``middle_block`` -> ``mid_block``, ``output_blocks[3i + j]`` ->
``up_blocks[i]`` sub-layer j (with two res blocks per level), ``out`` -> ``conv_norm_out`` /
``conv_out``. A ResBlock's ``in_layers / emb_layers / out_layers / skip_connection`` become
``norm1, conv1 / time_emb_proj / norm2, conv2 / conv_shortcut``; an AttentionBlock's fused ``qkv``
1-d convolution is split per head into ``to_q, to_k, to_v`` (ADM's legacy order interleaves q, k, v
inside each head). The noise schedule goes to a ``DDPMScheduler`` (``linear`` -> ``linear`` with
betas scaled by 1000 / T, ``cosine`` -> ``squaredcos_cap_v2``; ``learn_sigma`` -> variance
``learned_range``).

Files load with ``torch.load(weights_only=True)`` only: a checkpoint that needs arbitrary
unpickling is refused, never executed.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

ADM_DEFAULTS: dict[str, Any] = {
    # guided-diffusion's model_and_diffusion_defaults(): what its scripts use for a flag not given
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False, "learn_sigma": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False,
}

DDPMSEG_FLAGS: dict[str, Any] = {
    # DDPM-Seg's MODEL_FLAGS (scripts/ddpm/train_interpreter.sh), the same for all four of its checkpoints
    "attention_resolutions": "32,16,8", "class_cond": False, "diffusion_steps": 1000, "dropout": 0.1,
    "image_size": 256, "learn_sigma": True, "noise_schedule": "linear", "num_channels": 256,
    "num_head_channels": 64, "num_res_blocks": 2, "resblock_updown": True, "use_fp16": True,
    "use_scale_shift_norm": True,
}

ADM_PRESETS: dict[str, dict[str, Any]] = {
    "ddpm-seg": DDPMSEG_FLAGS,
    "lsun_bedroom": DDPMSEG_FLAGS,
    "lsun_cat": DDPMSEG_FLAGS,
    "lsun_horse": DDPMSEG_FLAGS,
    "ffhq": DDPMSEG_FLAGS,
    "lsun_horse_nodropout": {**DDPMSEG_FLAGS, "dropout": 0.0},
    "256x256_diffusion_uncond": {**DDPMSEG_FLAGS, "dropout": 0.0},
}
"""Flag sets by checkpoint name (file stem); every one is the 256² unconditional ADM."""

_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_NUM_CLASSES = 1000  # guided-diffusion's class-conditional models are ImageNet models


# ---------------------------------------------------------------------------- flags
def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ValueError(f"ADM flag {name}={v!r} must be a boolean (True/False)")


def parse_adm_flags(flags: str) -> dict[str, Any]:
    """A guided-diffusion command line (``"--image_size 256 --learn_sigma True ..."``) -> a flag dict."""
    toks = shlex.split(flags)
    if len(toks) % 2 or any(not t.startswith("--") for t in toks[::2]):
        raise ValueError(f"cannot parse ADM flags {flags!r}: expected '--name value' pairs, as in "
                         "guided-diffusion's MODEL_FLAGS")
    return {k[2:]: v for k, v in zip(toks[::2], toks[1::2])}


def resolve_adm_flags(flags: Mapping[str, Any] | str | None = None, path: str | Path | None = None) -> dict[str, Any]:
    """Complete, typed ADM flags: guided-diffusion's defaults updated with ``flags``.

    flags: a dict of flags, a preset name from :data:`ADM_PRESETS`, a guided-diffusion command line
    (``"--num_channels 256 ..."``), or None: the preset named like ``path``'s stem if there is one,
    else DDPM-Seg's flags (:data:`DDPMSEG_FLAGS`).
    """
    if flags is None:
        stem = Path(path).stem if path is not None else ""
        flags = ADM_PRESETS.get(stem, DDPMSEG_FLAGS)
    elif isinstance(flags, str):
        if flags.lstrip().startswith("--"):
            flags = parse_adm_flags(flags)
        elif flags in ADM_PRESETS:
            flags = ADM_PRESETS[flags]
        else:
            raise ValueError(f"unknown ADM preset {flags!r}; known: {sorted(ADM_PRESETS)} (or pass a dict of "
                             "guided-diffusion flags, or its command line '--image_size 256 ...')")
    elif not isinstance(flags, Mapping):
        raise TypeError(f"ADM flags must be a dict, a preset name or a command line; got {type(flags).__name__}")
    unknown = sorted(set(flags) - set(ADM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ADM flags {unknown}; guided-diffusion's model flags are {sorted(ADM_DEFAULTS)}")
    f = {**ADM_DEFAULTS, **flags}
    for k, d in ADM_DEFAULTS.items():
        if isinstance(d, bool):
            f[k] = _as_bool(k, f[k])
        elif isinstance(d, int):
            f[k] = int(f[k])
        elif isinstance(d, float):
            f[k] = float(f[k])
    mult = f["channel_mult"]
    if mult in ("", None, ()):
        if f["image_size"] not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(f"image_size {f['image_size']} has no default channel_mult in guided-diffusion "
                             f"({sorted(_DEFAULT_CHANNEL_MULT)}); pass channel_mult, e.g. '1,2,2'")
        mult = _DEFAULT_CHANNEL_MULT[f["image_size"]]
    elif isinstance(mult, str):
        mult = tuple(float(m) for m in mult.split(","))
    f["channel_mult"] = tuple(int(m) if float(m).is_integer() else float(m) for m in mult)
    res = f["attention_resolutions"]
    res = [int(r) for r in (res.split(",") if isinstance(res, str) else res) if str(r).strip() != ""]
    f["attention_resolutions"] = ",".join(str(r) for r in res)
    return f


def _attention_levels(f: dict[str, Any]) -> set[int]:
    """Levels (0 = full resolution) with attention: downsampling rate 2**level in image_size // res."""
    rates = {f["image_size"] // int(r) for r in f["attention_resolutions"].split(",") if r}
    return {lvl for lvl in range(len(f["channel_mult"])) if 2 ** lvl in rates}


def _head_dim(f: dict[str, Any]) -> int:
    """The one attention head width diffusers' UNet2DModel allows, checked against every attention layer."""
    C, mult = f["num_channels"], f["channel_mult"]
    att = _attention_levels(f)
    widths = [("middle_block", C * mult[-1], f["num_heads"])]
    up_heads = f["num_heads_upsample"] if f["num_heads_upsample"] != -1 else f["num_heads"]
    widths += [(f"level {lv} encoder", C * mult[lv], f["num_heads"]) for lv in sorted(att)]
    widths += [(f"level {lv} decoder", C * mult[lv], up_heads) for lv in sorted(att)]
    if f["num_head_channels"] != -1:
        d = f["num_head_channels"]
        bad = [(n, ch) for n, ch, _ in widths if ch % d]
        if bad:
            raise ValueError(f"num_head_channels={d} does not divide the attention widths {bad}")
        return d
    dims = {(n, ch // h) for n, ch, h in widths}
    if len({d for _, d in dims}) != 1 or any(ch % h for _, ch, h in widths):
        raise ValueError(f"num_heads={f['num_heads']} (upsample {up_heads}) gives different head widths per attention "
                         f"layer {sorted(dims)}; diffusers' UNet2DModel needs one head width: not convertible")
    return dims.pop()[1]


def adm_config(flags: Mapping[str, Any] | str | None = None, *, eps_only: bool = False) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` config (a dict for ``UNet2DModel(**cfg)``) of an ADM UNet.

    flags: as for :func:`resolve_adm_flags`. eps_only: 3 output channels (ADM's epsilon half)
    even when ``learn_sigma`` gives the checkpoint 6 (epsilon, then the variance interpolation).
    Raises ValueError for flag sets diffusers cannot express (see the module docstring).
    """
    f = resolve_adm_flags(flags)
    mult, C = f["channel_mult"], f["num_channels"]
    if mult[0] != 1:
        raise ValueError(f"channel_mult {mult} starts with {mult[0]}: diffusers' UNet2DModel ties the timestep "
                         "embedding width to the first level's channels, so only channel_mult[0] == 1 converts "
                         "(the 512x512 ADM models are not supported)")
    if any(not float(m * C).is_integer() for m in mult):
        raise ValueError(f"channel_mult {mult} x num_channels {C} must give whole channel counts")
    if f["rescale_timesteps"] and f["diffusion_steps"] != 1000:
        raise ValueError("rescale_timesteps=True with diffusion_steps != 1000 feeds the UNet t * 1000 / T, which "
                         "UNet2DModel cannot do: not supported")
    att = _attention_levels(f)
    updown = f["resblock_updown"]
    levels = range(len(mult))
    down = tuple("AttnDownBlock2D" if lv in att else ("ResnetDownsampleBlock2D" if updown else "DownBlock2D")
                 for lv in levels)
    up = tuple("AttnUpBlock2D" if lv in att else ("ResnetUpsampleBlock2D" if updown else "UpBlock2D")
               for lv in reversed(levels))
    return {
        "sample_size": f["image_size"],
        "in_channels": 3,
        "out_channels": 6 if f["learn_sigma"] and not eps_only else 3,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,      # ADM's embedding is [cos, sin] with frequencies exp(-ln(1e4) k / half)
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": up,
        "block_out_channels": tuple(int(m * C) for m in mult),
        "layers_per_block": f["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": f["dropout"],
        "act_fn": "silu",
        "attention_head_dim": _head_dim(f),
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,   # diffusers drops the mid attention's GroupNorm under scale_shift otherwise
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if f["use_scale_shift_norm"] else "default",
        "add_attention": True,
        "num_class_embeds": _NUM_CLASSES if f["class_cond"] else None,
    }


def adm_scheduler(flags: Mapping[str, Any] | str | None = None, *, eps_only: bool = False):
    """The ``DDPMScheduler`` of ADM's training noise schedule (``diffusion_steps``, ``noise_schedule``).

    Variance: ``learned_range`` when the UNet outputs ADM's learned variance (``learn_sigma`` and
    not ``eps_only``), ``fixed_small`` when that output was dropped, ``fixed_large`` (ADM's
    choice) for models without it. ``predict_xstart`` gives ``prediction_type="sample"``.
    """
    from diffusers import DDPMScheduler

    f = resolve_adm_flags(flags)
    T = f["diffusion_steps"]
    if f["noise_schedule"] == "linear":
        scale = 1000 / T  # ADM scales the 1e-4..0.02 range so any T spans the same noise levels
        sched = {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    elif f["noise_schedule"] == "cosine":
        sched = {"beta_schedule": "squaredcos_cap_v2"}
    else:
        raise ValueError(f"unknown noise_schedule {f['noise_schedule']!r}: ADM has 'linear' and 'cosine'")
    variance = ("learned_range" if not eps_only else "fixed_small") if f["learn_sigma"] else "fixed_large"
    return DDPMScheduler(num_train_timesteps=T, variance_type=variance, clip_sample=True,
                         prediction_type="sample" if f["predict_xstart"] else "epsilon", **sched)


# ---------------------------------------------------------------------------- key layout
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _layout(f: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(ADM module prefix, diffusers module prefix, kind) for every module with weights, in ADM's order.

    kind: ``plain`` (same parameters), ``conv1d`` (a 1x1 Conv1d that became a Linear), ``resblock``,
    ``attention``.
    """
    mult, nrb = f["channel_mult"], f["num_res_blocks"]
    att, last = _attention_levels(f), len(mult) - 1
    sampler = "resblock" if f["resblock_updown"] else "plain"
    out = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain")]
    if f["class_cond"]:
        out.append(("label_emb", "class_embedding", "plain"))
    out.append(("input_blocks.0.0", "conv_in", "plain"))
    k = 1
    for lv in range(len(mult)):
        for j in range(nrb):
            out.append((f"input_blocks.{k}.0", f"down_blocks.{lv}.resnets.{j}", "resblock"))
            if lv in att:
                out.append((f"input_blocks.{k}.1", f"down_blocks.{lv}.attentions.{j}", "attention"))
            k += 1
        if lv != last:
            # ADM's conv Downsample keeps its conv in `.op`; diffusers' Downsample2D calls it `.conv`
            src = f"input_blocks.{k}.0" + ("" if f["resblock_updown"] else ".op")
            dst = f"down_blocks.{lv}.downsamplers.0" + ("" if f["resblock_updown"] else ".conv")
            out.append((src, dst, sampler))
            k += 1
    out += [("middle_block.0", "mid_block.resnets.0", "resblock"),
            ("middle_block.1", "mid_block.attentions.0", "attention"),
            ("middle_block.2", "mid_block.resnets.1", "resblock")]
    k = 0
    for i, lv in enumerate(reversed(range(len(mult)))):
        for j in range(nrb + 1):
            out.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resblock"))
            sub = 1
            if lv in att:
                out.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
                sub = 2
            if lv and j == nrb:
                src = f"output_blocks.{k}.{sub}" + ("" if f["resblock_updown"] else ".conv")
                dst = f"up_blocks.{i}.upsamplers.0" + ("" if f["resblock_updown"] else ".conv")
                out.append((src, dst, sampler))
            k += 1
    out += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return out


Rule = tuple[tuple[int, ...], Callable[[torch.Tensor], dict[str, torch.Tensor]]]


def _rules(f: dict[str, Any], expected: Mapping[str, torch.Size], eps_only: bool) -> dict[str, Rule]:
    """ADM key -> (its expected shape, tensor -> {diffusers key: tensor}), from the diffusers model's own keys."""
    rules: dict[str, Rule] = {}
    new_order = f["use_new_attention_order"]

    def same(dk: str) -> Callable:
        return lambda t: {dk: t}

    def squeeze(dk: str) -> Callable:
        return lambda t: {dk: t.reshape(t.shape[0], t.shape[1]) if t.ndim == 3 else t}

    def add(adm: str, dk: str, conv1d: bool = False) -> None:
        if dk not in expected:
            return
        shape = tuple(expected[dk]) + ((1,) if conv1d and len(expected[dk]) == 2 else ())
        rules[adm] = (shape, squeeze(dk) if conv1d else same(dk))

    for src, dst, kind in _layout(f):
        for p in ("weight", "bias"):
            if kind == "plain":
                add(f"{src}.{p}", f"{dst}.{p}")
            elif kind == "resblock":
                for a, d in _RESBLOCK.items():
                    add(f"{src}.{a}.{p}", f"{dst}.{d}.{p}")
            elif kind == "attention":
                add(f"{src}.norm.{p}", f"{dst}.group_norm.{p}")
                add(f"{src}.proj_out.{p}", f"{dst}.to_out.0.{p}", conv1d=True)
                q = expected[f"{dst}.to_q.{p}"]
                width, d = q[0], _head_dim(f)
                heads = width // d

                def split(t: torch.Tensor, dst=dst, p=p, heads=heads, d=d) -> dict[str, torch.Tensor]:
                    rest = t.shape[1:2] if t.ndim == 3 else ()          # (C,) for weights, () for biases
                    # legacy order: per head [q_h, k_h, v_h]; new order: [q_all_heads, k_all_heads, v_all_heads]
                    t = t.reshape(3, heads, d, *rest) if new_order else t.reshape(heads, 3, d, *rest).transpose(0, 1)
                    return {f"{dst}.{n}.{p}": t[i].reshape(heads * d, *rest).contiguous()
                            for i, n in enumerate(("to_q", "to_k", "to_v"))}

                shape = (3 * width, *q[1:], 1) if p == "weight" else (3 * width,)
                rules[f"{src}.qkv.{p}"] = (shape, split)
    if eps_only and f["learn_sigma"]:
        # keep only the epsilon half of the final conv (ADM: channels 0..2 epsilon, 3..5 variance)
        for p in ("weight", "bias"):
            dk = f"conv_out.{p}"
            shape = (6, *expected[dk][1:])
            rules[f"out.2.{p}"] = (shape, lambda t, dk=dk: {dk: t[:3].contiguous()})
    return rules


def _listing(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def convert_adm_state_dict(state_dict: Mapping[str, torch.Tensor], flags: Mapping[str, Any] | str | None = None,
                           *, dtype: torch.dtype = torch.float32, eps_only: bool = False):
    """An ADM (guided-diffusion ``UNetModel``) state dict -> a diffusers ``UNet2DModel`` with its weights.

    state_dict: ADM parameter name -> tensor (any float dtype, any device; cast to ``dtype``, kept
    on its device). flags: the model flags it was trained with (see :func:`resolve_adm_flags`;
    None = DDPM-Seg's). eps_only: keep only the epsilon half of a ``learn_sigma`` output
    (``out_channels`` 3 instead of 6). Every key must be consumed and every diffusers parameter
    filled, with matching shapes: otherwise a ValueError lists the missing, unexpected and
    mis-shaped keys (usually: the flags are not the checkpoint's). Returns the model in eval mode.
    """
    from diffusers import UNet2DModel

    f = resolve_adm_flags(flags)
    cfg = adm_config(f, eps_only=eps_only)
    with torch.device("meta"):  # no memory, no random init: every parameter is assigned below
        unet = UNet2DModel(**cfg)
    expected = {k: v.shape for k, v in unet.state_dict().items()}
    rules = _rules(f, expected, eps_only)
    missing = [k for k in rules if k not in state_dict]
    unexpected = [k for k in state_dict if k not in rules]
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {rules[k][0]})" for k in rules
             if k in state_dict and tuple(state_dict[k].shape) != rules[k][0]]
    not_float = [k for k in rules if k in state_dict and not torch.is_floating_point(state_dict[k])]
    if missing or unexpected or wrong or not_float:
        parts = [f"{len(missing)} missing: {_listing(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected (not consumed): {_listing(unexpected)}" if unexpected else "",
                 f"{len(wrong)} with other shapes: {_listing(wrong, 6)}" if wrong else "",
                 f"{len(not_float)} not floating point: {_listing(not_float)}" if not_float else ""]
        raise ValueError("this state dict is not the ADM UNet the flags describe ("
                         + "; ".join(p for p in parts if p) + "). Pass the flags the checkpoint was trained with "
                         "(guided-diffusion MODEL_FLAGS, as a dict, a '--name value' string or a preset name from "
                         f"{sorted(ADM_PRESETS)}); flags used: {_flag_summary(f)}")
    new: dict[str, torch.Tensor] = {}
    for k, (_, fn) in rules.items():
        new.update(fn(state_dict[k].to(dtype)))
    left = sorted(set(expected) - set(new))
    if left:  # a layout bug, not a user error
        raise RuntimeError(f"ADM conversion left diffusers parameters unset: {_listing(left)}")
    unet.load_state_dict(new, strict=True, assign=True)
    meta = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"ADM conversion left tensors on the meta device: {_listing(meta)}")
    return unet.eval()


def _flag_summary(f: dict[str, Any]) -> str:
    keys = ("image_size", "num_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
            "num_head_channels", "num_heads", "learn_sigma", "class_cond", "resblock_updown", "use_scale_shift_norm")
    return ", ".join(f"{k}={f[k]}" for k in keys)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.pt`` / ``.pth`` file -> its state dict, read with ``torch.load(weights_only=True)`` on CPU.

    Anything that needs more than tensors and plain containers to unpickle is refused (ValueError)
    without running any of its code. A dict holding the state dict under ``state_dict``, ``model``
    or ``ema`` is unwrapped.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ADM checkpoint at {path} (DDPM-Seg downloads them with "
                                "checkpoints/ddpm/download_checkpoint.sh <lsun_bedroom|ffhq|lsun_cat|lsun_horse>)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path}: it is not a plain tensor state dict, and unpickling it would "
                         f"execute code from the file ({str(e).splitlines()[0][:160]}). Re-save it as a state dict of "
                         "tensors (torch.save(model.state_dict(), ...)) in a trusted environment.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "ema"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor); got {type(obj).__name__}")
    return dict(obj)


def load_adm_checkpoint(path: str | Path, flags: Mapping[str, Any] | str | None = None, *,
                        dtype: torch.dtype = torch.float32, eps_only: bool = False):
    """An ADM ``.pt`` checkpoint -> ``(UNet2DModel, DDPMScheduler)``, both on CPU.

    flags: the checkpoint's model flags (dict, preset name, or guided-diffusion command line);
    None picks the preset named like the file (``ffhq.pt`` -> ``"ffhq"``), else DDPM-Seg's flags.
    eps_only: drop ADM's learned-variance output channels (the UNet then predicts epsilon only and
    the scheduler uses a fixed variance). The decoder features are the same either way.
    """
    f = resolve_adm_flags(flags, path)
    unet = convert_adm_state_dict(read_state_dict(path), f, dtype=dtype, eps_only=eps_only)
    return unet, adm_scheduler(f, eps_only=eps_only)
