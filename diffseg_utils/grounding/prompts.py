"""Prompts and seeds of grounding samples, and which prompt template a backbone speaks.

The template belongs to the backbone (how its text encoder was trained to read a class name):
the toy SD was trained on "a photo of a ..." captions, Stable Diffusion gets the paper's
"a photograph of a {}". Every grounding entry point reads it with :func:`prompt_template`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAPER_TEMPLATE = "a photograph of a {}"
"""Grounded Diffusion's prompt template (Li et al., 2023): used when a backbone defines none."""

MAX_CLASSES = 2
"""Classes named per prompt at most (the paper's one- and two-class prompts); the M in (n, M, H, W)."""

_PROMPT_STREAM = 0x9E0C  # keeps the prompt RNG apart from any other use of (seed, index)


def check_template(template: str) -> str:
    """``template`` if it is a string with exactly one ``{}`` slot; else a ValueError saying so."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' slot for the class name(s), got {template!r} "
                         "(e.g. 'a photo of a {}')")
    return template


def prompt_template(backbone) -> str:
    """The backbone's prompt template: its ``prompt_template`` attribute, else :data:`PAPER_TEMPLATE`."""
    return check_template(getattr(backbone, "prompt_template", None) or PAPER_TEMPLATE)


def sample_prompt(class_names: Sequence[str], index: int, seed: int = 0, template: str = PAPER_TEMPLATE,
                  two_prob: float = 0.5) -> tuple[str, list[str]]:
    """The prompt of sample ``index`` and the class names it mentions.

    One class, or with probability ``two_prob`` two distinct ones (when there are two to pick):
    ``template.format("c1")`` or ``template.format("c1 and a c2")``, i.e. with the paper's
    template "a photograph of a c1" / "a photograph of a c1 and a c2". Pass the backbone's
    template (:func:`prompt_template`). Each sample has its own RNG seeded by ``(seed, index)``:
    the same for any batching or number of processes.
    """
    if not class_names:
        raise ValueError("class_names is empty: prompts need at least one class")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    check_template(template)
    rng = np.random.default_rng([seed, index, _PROMPT_STREAM])
    k = 2 if len(class_names) >= 2 and rng.random() < two_prob else 1
    names = [str(class_names[i]) for i in rng.choice(len(class_names), size=k, replace=False)]
    return template.format(" and a ".join(names)), names


def sample_seed(seed: int, index: int) -> int:
    """The generation (initial-noise) seed of sample ``index``: depends on nothing else."""
    return seed * 1_000_003 + index
