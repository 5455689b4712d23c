"""Finding and loading a backbone's weights: registered short names, local directories, the Hugging
Face cache, guided-diffusion (ADM) checkpoints, and untrained copies for baselines.

>>> bb = load_backbone("toy")          # or "sd-1.5", "ddpm-bedroom", a directory, a hub id, "ffhq.pt"
>>> ref = untrained_like(bb)           # same architecture, random weights

Weights load from local directories or the local Hugging Face cache. Downloads happen only when
``allow_download`` is true (default: unless ``HF_HUB_OFFLINE=1``); missing weights raise
:class:`WeightsNotAvailableError` saying how to get them. The wrapper itself is
:class:`~diffseg_utils.backbones.Backbone`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .backbones import FAMILIES, Backbone, PixelBackbone, SDBackbone, default_device
from .registry import (REGISTRY, TOY_FACES_DIR, TOY_FACES_TRAIN_COMMAND, TOY_SD3_DIR, TOY_SD3_TRAIN_COMMAND, TOY_SD_DIR,
                       TOY_TRAIN_COMMAND)


class WeightsNotAvailableError(FileNotFoundError):
    """The weights of a backbone are neither in a local directory nor in the local HF cache."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _missing(source: str, why: str) -> WeightsNotAvailableError:
    if Path(source).resolve() == TOY_SD_DIR.resolve():
        return WeightsNotAvailableError(
            f"the toy model in {source} is missing or incomplete ({why}). It ships with the repo: "
            f"restore it with `git checkout -- data/toy-sd`, or retrain it with `{TOY_TRAIN_COMMAND}`.")
    return WeightsNotAvailableError(
        f"weights for {source!r} are not available offline ({why}). Either (1) download them once on a "
        f"connected machine, e.g. `huggingface-cli download {source}` (they land in the HF cache, "
        f"~/.cache/huggingface, which you can copy here), or (2) pass a local directory holding the "
        f"diffusers files: load_backbone('/path/to/model').")


EXPECTED_LOCAL_LAYOUTS = (
    "a diffusers pipeline directory: model_index.json with unet/ and scheduler/ subfolders "
    "(plus vae/, text_encoder/, tokenizer/ for Stable Diffusion)",
    "a UNet2DModel directory: config.json and diffusion_pytorch_model.safetensors (scheduler/ or "
    "scheduler_config.json optional)",
    "an openai guided-diffusion ADM checkpoint file ending in .pt (with adm_flags=... unless it is DDPM-Seg's)",
)


def _looks_local(source: str) -> bool:
    """A path on this machine rather than a hub id ('owner/name'): explicit, nested, or under an existing folder."""
    p = Path(source)
    if p.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in source:
        return True
    return p.parent != Path(".") and p.parent.is_dir()


def _missing_local(source: str) -> WeightsNotAvailableError:
    """A local path that does not exist (or is not a model): say so and list what load_backbone reads."""
    p = Path(source)
    resolved = p.resolve()
    if resolved == TOY_SD_DIR.resolve():
        return _missing(source, "no such directory")
    if resolved == TOY_FACES_DIR.resolve():
        return WeightsNotAvailableError(
            f"the toy faces DDPM in {source} does not exist yet: train it with `{TOY_FACES_TRAIN_COMMAND}`.")
    if resolved == TOY_SD3_DIR.resolve():
        return WeightsNotAvailableError(
            f"the toy MM-DiT in {source} does not exist yet: train it with `{TOY_SD3_TRAIN_COMMAND}`.")
    if p.is_file():
        what = f"{source!r} is a file, not a directory"
    else:
        parent = next((q for q in resolved.parents if q.is_dir()), None)
        what = (f"{source!r}: no such directory ({resolved} does not exist"
                + (f"; the nearest existing folder is {parent})" if parent is not None else ")"))
    listing = "".join(f"\n  - {x}" for x in EXPECTED_LOCAL_LAYOUTS)
    return WeightsNotAvailableError(
        f"{what}. load_backbone reads a registered short name ({', '.join(sorted(REGISTRY))}), a Hugging Face "
        f"hub id such as 'google/ddpm-ema-bedroom-256', or a local path to one of:{listing}")


def _read_index(source: str, local_only: bool) -> tuple[dict | None, str]:
    """model_index.json (or None) and a local root for the source."""
    p = Path(source)
    if p.is_dir():
        idx = p / "model_index.json"
        try:
            return (json.loads(idx.read_text()) if idx.exists() else None), str(p)
        except json.JSONDecodeError:
            raise _missing(source, f"corrupt {idx}") from None
    if _looks_local(source):
        raise _missing_local(source)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        f = hf_hub_download(source, "model_index.json", local_files_only=local_only)
        return json.loads(Path(f).read_text()), source
    except EntryNotFoundError:
        return None, source
    except Exception as e:  # LocalEntryNotFoundError, connection errors, repo not found
        raise _missing(source, f"{type(e).__name__}") from None


def load_backbone(name_or_path: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  *, allow_download: bool | None = None, adm_flags: dict | str | None = None, **options) -> Backbone:
    """Load a diffusers backbone by short name (see :func:`list_backbones`), local directory or hub id.

    A pipeline directory's ``model_index.json`` names its family (:data:`~diffseg_utils.backbones.FAMILIES`):
    SD 1.x/2.x, SDXL / SSD-1B, SD3 / SD3.5, Flux, PixArt-Σ / -α; a bare ``UNet2DModel`` checkpoint
    (google/ddpm-*) gives a pixel backbone. SD3 pipelines without T5 load with or without it.
    A ``.pt`` / ``.pth`` file is an openai guided-diffusion ADM checkpoint (DDPM-Seg's
    ``lsun_bedroom.pt``, ``lsun_cat.pt``, ``lsun_horse.pt``, ``ffhq.pt``): converted into a
    ``UNet2DModel`` by :mod:`diffseg_utils.adm` (read with ``torch.load(weights_only=True)``), with
    ``adm_flags`` its model flags (dict, preset name or guided-diffusion command line; default: the
    preset named like the file, else DDPM-Seg's flags). The backbone's UNet predicts epsilon only
    (ADM's learned-variance channels are dropped; features are unaffected).
    ``device`` defaults to CUDA/MPS when present, else CPU; ``dtype`` to fp16 on CUDA, else fp32.
    ``options`` go to the family (over the registry's): ``max_sequence_length`` (SD3, Flux, PixArt),
    ``guidance`` (Flux), ``sample_size`` (the native latent side, for a config that names none).
    """
    if str(name_or_path).endswith((".pt", ".pth")) and name_or_path not in REGISTRY:
        return _load_adm_backbone(str(name_or_path), device, dtype, adm_flags)
    if adm_flags is not None:
        raise ValueError(f"adm_flags only applies to openai guided-diffusion .pt checkpoints; {name_or_path!r} is not "
                         "a .pt file")
    entry = REGISTRY.get(name_or_path)
    source = entry.source if entry else name_or_path
    if allow_download is None:
        allow_download = not _offline()
    local_only = not allow_download or Path(source).is_dir()
    index, root = _read_index(source, local_only)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    kw: dict[str, Any] = {"local_files_only": local_only}
    mkw: dict[str, Any] = {**kw, "torch_dtype": dtype}
    name = name_or_path
    family = _family(index, source)
    try:
        bb = family.from_pretrained(root, index, kw=kw, mkw=mkw, has_subfolder=lambda sub: _has_subfolder(root, sub, kw),
                                    name=name, device=device, dtype=dtype, **{**(entry.options if entry else {}), **options})
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, WeightsNotAvailableError):
            raise
        raise _missing(source, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return _annotate(bb, entry)


def _family(index: dict | None, source: str) -> type[Backbone]:
    """The backbone family of a pipeline directory (``model_index.json``), or a bare ``UNet2DModel``."""
    if index is None:
        return PixelBackbone
    cls = index.get("_class_name", "")
    if cls in FAMILIES:
        return FAMILIES[cls]
    if "vae" in index and "unet" in index and "text_encoder_2" not in index:
        return SDBackbone  # an SD 1.x/2.x-style pipeline under another class name
    if "vae" not in index and "unet" in index:
        return PixelBackbone
    raise ValueError(f"{source!r} is a {cls or 'pipeline'} directory, a family this package does not load; "
                     f"known pipeline classes: {', '.join(sorted(FAMILIES))} (a family is one module in "
                     f"diffseg_utils/backbones/)")


def _annotate(bb: Backbone, entry) -> Backbone:
    """Copy a registry entry's per-backbone conventions onto the backbone (prompt template, the
    dataset it belongs to, the module holding its toy-specific grounding defaults)."""
    if entry is not None:
        bb.prompt_template = entry.prompt_template
        bb.dataset = entry.dataset
        bb.grounding_defaults = entry.grounding_defaults
    return bb


def _load_adm_backbone(path: str, device, dtype, adm_flags) -> Backbone:
    """A pixel Backbone on an ADM ``.pt`` checkpoint (epsilon-only UNet2DModel + its DDPMScheduler)."""
    from .adm import load_adm_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        parent = next((q for q in p.resolve().parents if q.is_dir()), None)
        raise WeightsNotAvailableError(
            f"no ADM checkpoint at {p.resolve()} (the file does not exist"
            + (f"; the nearest existing folder is {parent}" if parent is not None else "") + "). A .pt path must be an "
            "openai guided-diffusion UNet state dict, e.g. DDPM-Seg's lsun_bedroom.pt, lsun_cat.pt, lsun_horse.pt or "
            "ffhq.pt (downloaded by checkpoints/ddpm/download_checkpoint.sh <name> in "
            "yandex-research/ddpm-segmentation).")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    unet, scheduler = load_adm_checkpoint(p, adm_flags, dtype=dtype, eps_only=True)
    return PixelBackbone(unet=unet, scheduler=scheduler, name=path, device=device, dtype=dtype)


def _has_subfolder(root: str, sub: str, kw: dict) -> bool:
    if Path(root).is_dir():
        return (Path(root) / sub).is_dir()
    from huggingface_hub import hf_hub_download

    for fname in ("config.json", "scheduler_config.json"):
        try:
            hf_hub_download(root, f"{sub}/{fname}", **kw)
            return True
        except Exception:
            pass
    return False


def untrained_like(backbone: Backbone, seed: int = 0) -> Backbone:
    """The same backbone with a randomly initialised denoiser (same config), for 'is it the training?' baselines.

    VAE, text encoders and scheduler are shared with ``backbone``; only the UNet / transformer is re-initialised.
    """
    torch.manual_seed(seed)
    denoiser = type(backbone.denoiser).from_config(backbone.denoiser.config)
    return backbone.with_denoiser(denoiser, name=f"{backbone.name} (untrained {type(denoiser).__name__})")
