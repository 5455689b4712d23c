"""Short names for the backbones this repo knows, and where their weights live.

``load_backbone("sd-1.5")`` reads the Hugging Face hub id from here; a local directory or any
other hub id works too. ``"toy"`` is the tiny Stable Diffusion this repo trains and ships in
``data/toy-sd`` (see ``python -m diffseg_utils.toy.train --help``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
TOY_SD_DIR = DATA_DIR / "toy-sd"
TOY_TRAIN_COMMAND = "python -m diffseg_utils.toy.train --out data/toy-sd"
TOY_SD3_DIR = DATA_DIR / "toy-sd3"
TOY_SD3_TRAIN_COMMAND = "python -m diffseg_utils.toy.train --model sd3 --out data/toy-sd3"
TOY_FACES_DIR = DATA_DIR / "toy-faces-ddpm"
TOY_FACES_TRAIN_COMMAND = "python -m diffseg_utils.toy.train --world faces --out data/toy-faces-ddpm"
PAPER_PROMPT_TEMPLATE = "a photograph of a {}"
"""Grounded Diffusion's prompt template (Li et al., 2023), used by backbones that do not define their own."""


@dataclass(frozen=True)
class RegistryEntry:
    """Where a named backbone's weights are: a hub id or a local directory."""

    source: str
    kind: str  # "latent" (Stable Diffusion style) or "pixel" (DDPM / ADM style)
    note: str = ""
    prompt_template: str = PAPER_PROMPT_TEMPLATE  # how a class name becomes a prompt (text-conditional models)
    dataset: str | None = None  # the dataset the model was trained on / is meant for, when there is one
    grounding_defaults: str | None = None  # 'package.module:NAME' of its GroundingDefaults (toy)
    options: dict = field(default_factory=dict)  # keyword arguments of its family's from_pretrained


REGISTRY: dict[str, RegistryEntry] = {
    # the toy SD was trained on captions "a photo of a ..." only: "photograph" is an untrained token for it
    "toy": RegistryEntry(str(TOY_SD_DIR), "latent", "tiny SD trained on the toy shapes world, shipped in data/toy-sd",
                         prompt_template="a photo of a {}", dataset="toy-shapes",
                         grounding_defaults="diffseg_utils.toy.grounding_defaults:TOY"),
    # the toy MM-DiT has no T5: its prompts are the 16 CLIP tokens alone (it was trained with max_sequence_length=0)
    "toy-sd3": RegistryEntry(str(TOY_SD3_DIR), "latent", "tiny SD3-architecture MM-DiT trained on the toy shapes world, "
                             "shipped in data/toy-sd3", prompt_template="a photo of a {}", dataset="toy-shapes",
                             grounding_defaults="diffseg_utils.toy.grounding_defaults:TOY_SD3",
                             options={"max_sequence_length": 0}),
    "toy-faces-ddpm": RegistryEntry(str(TOY_FACES_DIR), "pixel",
                                    "tiny unconditional pixel DDPM trained on the toy faces world, shipped in "
                                    "data/toy-faces-ddpm", dataset="toy-faces"),
    "sd-1.4": RegistryEntry("CompVis/stable-diffusion-v1-4", "latent"),
    "sd-1.5": RegistryEntry("stable-diffusion-v1-5/stable-diffusion-v1-5", "latent"),
    "sd-2.1-base": RegistryEntry("stabilityai/stable-diffusion-2-1-base", "latent"),
    "sdxl": RegistryEntry("stabilityai/stable-diffusion-xl-base-1.0", "latent"),
    "ssd-1b": RegistryEntry("segmind/SSD-1B", "latent"),
    "sd3-medium": RegistryEntry("stabilityai/stable-diffusion-3-medium-diffusers", "latent"),
    "sd3.5-medium": RegistryEntry("stabilityai/stable-diffusion-3.5-medium", "latent"),
    "sd3.5-large": RegistryEntry("stabilityai/stable-diffusion-3.5-large", "latent"),
    "flux-dev": RegistryEntry("black-forest-labs/FLUX.1-dev", "latent"),
    "flux-schnell": RegistryEntry("black-forest-labs/FLUX.1-schnell", "latent", options={"max_sequence_length": 256}),
    "pixart-sigma": RegistryEntry("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "latent"),
    "ddpm-bedroom": RegistryEntry("google/ddpm-ema-bedroom-256", "pixel"),
    "ddpm-cat": RegistryEntry("google/ddpm-ema-cat-256", "pixel"),
    "ddpm-church": RegistryEntry("google/ddpm-ema-church-256", "pixel"),
    "ddpm-celebahq": RegistryEntry("google/ddpm-ema-celebahq-256", "pixel"),
}


def list_backbones() -> dict[str, str]:
    """Short name -> hub id or local path, for every registered backbone."""
    return {k: v.source for k, v in REGISTRY.items()}
