"""Short names for the backbones this repo knows, and where their weights live.

``load_backbone("sd-1.5")`` reads the Hugging Face hub id from here; a local directory or any
other hub id works too. ``"toy"`` is the tiny Stable Diffusion this repo trains and ships in
``data/toy-sd`` (see ``python -m diffseg_utils.toy.train --help``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
TOY_SD_DIR = DATA_DIR / "toy-sd"
TOY_TRAIN_COMMAND = "python -m diffseg_utils.toy.train --out data/toy-sd"


@dataclass(frozen=True)
class RegistryEntry:
    """Where a named backbone's weights are: a hub id or a local directory."""

    source: str
    kind: str  # "latent" (Stable Diffusion style) or "pixel" (DDPM / ADM style)
    note: str = ""


REGISTRY: dict[str, RegistryEntry] = {
    "toy": RegistryEntry(str(TOY_SD_DIR), "latent", "tiny SD trained on the toy world, shipped in data/toy-sd"),
    "sd-1.4": RegistryEntry("CompVis/stable-diffusion-v1-4", "latent"),
    "sd-1.5": RegistryEntry("stable-diffusion-v1-5/stable-diffusion-v1-5", "latent"),
    "sd-2.1-base": RegistryEntry("stabilityai/stable-diffusion-2-1-base", "latent"),
    "ddpm-bedroom": RegistryEntry("google/ddpm-ema-bedroom-256", "pixel"),
    "ddpm-cat": RegistryEntry("google/ddpm-ema-cat-256", "pixel"),
    "ddpm-church": RegistryEntry("google/ddpm-ema-church-256", "pixel"),
    "ddpm-celebahq": RegistryEntry("google/ddpm-ema-celebahq-256", "pixel"),
}


def list_backbones() -> dict[str, str]:
    """Short name -> hub id or local path, for every registered backbone."""
    return {k: v.source for k, v in REGISTRY.items()}
