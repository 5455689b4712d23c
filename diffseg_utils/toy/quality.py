"""Measured quality of the tiny SD: reconstruction PSNR, prompt fidelity, few-shot probe.

These are the numbers notebook 00 prints, the tests check on small samples, and the training
script's ``gate`` stage records for every checkpoint.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone
from ..features import FeatureMaps, extract_features
from ..metrics import foreground_breakdown, mean_iou, psnr
from ..probes import ProbeTable, mlp_probe_predict, probe_features, probe_grid, rgb_features
from ..sampling import generate
from .world import CATEGORIES, NUM_CLASSES, caption_for, render


@torch.no_grad()
def reconstruction_psnr(backbone: Backbone, n: int = 64, split: str = "vae_test") -> float:
    """Mean PSNR (dB, images in [0, 1]) of VAE encode -> decode on held-out toy images."""
    b = render(split, 0, n)
    x = backbone.preprocess(b.images)
    return psnr(x, backbone.decode(backbone.encode(x)).clamp(-1, 1))


def fidelity_prompts(n: int, seed: int = 0, max_objects: int = 2) -> tuple[list[str], list[list[int]]]:
    """n prompts naming 1..max_objects distinct random categories, and their class ids."""
    rng = np.random.default_rng(seed)
    prompts, classes = [], []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        cls = [int(c) + 1 for c in rng.choice(len(CATEGORIES), size=k, replace=False)]
        classes.append(cls)
        prompts.append(caption_for([CATEGORIES[c - 1] for c in cls]))
    return prompts, classes


@torch.no_grad()
def prompt_fidelity(backbone: Backbone, oracle, n: int = 64, *, guidance_scale: float = 5.0, num_steps: int = 25,
                    seed: int = 0, max_objects: int = 2, batch_size: int = 32) -> dict:
    """Fraction of generated images in which the oracle finds *every* prompted category.

    Also reports the per-object hit rate. Prompts are random 1..max_objects-object captions.
    """
    prompts, classes = fidelity_prompts(n, seed, max_objects)
    all_found, hits, total = 0, 0, 0
    for s in range(0, n, batch_size):
        imgs = generate(backbone, prompts[s:s + batch_size], num_steps=num_steps, guidance_scale=guidance_scale, seed=seed * 100_000 + s)
        found = oracle(imgs).scores > 0  # (b, K)
        for row, cls in zip(found, classes[s:s + batch_size]):
            ok = [bool(row[c - 1]) for c in cls]
            hits += sum(ok)
            total += len(ok)
            all_found += all(ok)
    return {"all_found": all_found / n, "object_hit_rate": hits / total, "n": n, "guidance_scale": guidance_scale}


@dataclass
class ProbeReport:
    """Few-shot probe of one feature source at one place ``(block, t)``.

    ``ridge`` and ``mlp`` are the test mIoU of the ridge probe and of a DDPM-Seg member MLP
    there; ``table`` is the validation sweep that picked the place (None when it was given); ``fg_iou`` and
    ``class_acc_on_fg`` split its error into finding objects and naming them
    (:func:`~diffseg_utils.metrics.foreground_breakdown`).
    """

    block: str
    t: int
    ridge: float
    mlp: float
    fg_iou: float
    class_acc_on_fg: float
    table: ProbeTable | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "table"}


def _mlp_report(f_tr: FeatureMaps, f_te: FeatureMaps, tr, te, seed: int, k: int = NUM_CLASSES) -> tuple[float, dict]:
    pred = mlp_probe_predict(f_tr, tr.labels, f_te, k, seed=seed).cpu()
    return mean_iou(pred, te.labels, k), foreground_breakdown(pred, te.labels)


def _draw(world: str, split: str, start: int, n: int, max_objects: int, size: int = 64):
    if world == "shapes":
        return render(split, start, n, max_objects=max_objects, size=size)
    from .faces import render_faces

    if world != "faces":
        raise ValueError(f"unknown toy world {world!r}; valid: 'shapes', 'faces'")
    return render_faces(split, start, n, size=size)


VAL_START = 10_000
"""Validation images (that pick the probe's place) are ``fewshot_test`` images from this index on,
disjoint from the test images ``0 .. n_test - 1``."""


GATE_START = VAL_START + 1_000
"""The training gates score their probe on ``fewshot_test`` images from this index on: validation images (the
notebooks' test images are 0 … 9 999) past the ones that pick places (:data:`VAL_START` …)."""


def fewshot_probe(backbone: Backbone, *, n_train: int = 20, n_test: int = 20, n_val: int = 20,
                  timesteps: tuple[int, ...] = (25, 100), at: tuple[str, int] | None = None, max_objects: int = 3,
                  seed: int = 0, world: str = "shapes", test_start: int = 0) -> ProbeReport:
    """The toy model's few-shot probe (notebook 00; the target is mIoU >= 0.60, `TARGETS`).

    A closed-form ridge probe per up-block sub-module x ``timesteps`` (a *place*), fitted on
    ``n_train`` ``fewshot_train`` images and scored on ``n_val`` validation images
    (:data:`VAL_START`), picks the place; there, the ridge probe and one DDPM-Seg member MLP
    (trained on every labelled pixel) are scored on ``n_test`` held-out ``fewshot_test`` images.
    ``at`` fixes the place instead (to probe another backbone where the first one was probed);
    ``max_objects`` < 3 renders simpler scenes. ``table`` holds the validation sweep (none with ``at``).
    ``world`` is the toy world the images come from ("shapes" or "faces"). ``test_start``: the first scored
    ``fewshot_test`` image; the training gates pass :data:`GATE_START` so that no training decision reads an image
    that a notebook reports a number on.
    """
    from .oracle import world_spec

    k = len(world_spec(world)[1]) + 1
    size = backbone.resolution
    tr = _draw(world, "fewshot_train", 0, n_train, max_objects, size)
    if test_start < VAL_START and test_start + n_test > VAL_START:
        raise ValueError(f"scored images {test_start}..{test_start + n_test - 1} would reach the validation images "
                         f"(fewshot_test {VAL_START} on) that pick the place")
    te = _draw(world, "fewshot_test", test_start, n_test, max_objects, size)
    ups = backbone.feature_blocks()  # a UNet's decoder, every block of a DiT
    if at is not None and (at[0] not in ups or at[1] not in timesteps):
        raise ValueError(f"at={at!r} is not a probed place; blocks: {ups}, timesteps: {list(timesteps)}")
    if at is None and not n_val:
        raise ValueError("give n_val > 0 (validation images pick the place) or a place at=(block, t)")
    kw = dict(seed=seed, batch_size=16, progress=False)
    table = None
    if at is None:  # sweep every place on validation images, then keep the best one's train features
        f_tr = extract_features(backbone, tr.images, ups, list(timesteps), **kw)
        va = _draw(world, "fewshot_test", VAL_START, n_val, max_objects, size)
        table = probe_grid(train_labels=tr.labels, test_labels=va.labels, blocks=ups, timesteps=list(timesteps), num_classes=k,
                           seed=seed, progress=False, train_features=f_tr,
                           test_features=extract_features(backbone, va.images, ups, list(timesteps), **kw))
        block, t = table.best()[:2]
        f_tr = f_tr.select([block], [t])
    else:
        block, t = at  # all timesteps in one UNet call, as the sweep does, so the features match it exactly
        f_tr = extract_features(backbone, tr.images, [block], list(timesteps), **kw).select([block], [t])
    f_te = extract_features(backbone, te.images, [block], [t], **kw)
    ridge = probe_features(f_tr, tr.labels, f_te, te.labels, k, seed=seed)
    mlp, parts = _mlp_report(f_tr, f_te, tr, te, seed, k)
    return ProbeReport(block, int(t), float(ridge), mlp, parts["fg_iou"], parts["class_acc_on_fg"], table)


def fewshot_probe_rgb(*, n_train: int = 20, n_test: int = 20, max_objects: int = 3, seed: int = 0,
                      world: str = "shapes", position: bool = False, size: int = 64, test_start: int = 0) -> ProbeReport:
    """:func:`fewshot_probe` on raw pixel colours (the floor every feature must beat);
    ``position=True`` adds the pixel's position (random Fourier features of (x, y), :func:`~diffseg_utils.baselines.rgbxy_features`)."""
    from ..baselines import rgbxy_features
    from .oracle import world_spec

    k = len(world_spec(world)[1]) + 1
    tr = _draw(world, "fewshot_train", 0, n_train, max_objects, size)
    te = _draw(world, "fewshot_test", test_start, n_test, max_objects, size)
    feat = rgbxy_features if position else rgb_features
    as_maps = lambda b: feat(torch.from_numpy(b.images).permute(0, 3, 1, 2).float() / 255)  # noqa: E731
    f_tr, f_te = as_maps(tr), as_maps(te)
    ridge = probe_features(f_tr, tr.labels, f_te, te.labels, k, seed=seed)
    mlp, parts = _mlp_report(f_tr, f_te, tr, te, seed, k)
    return ProbeReport("rgbxy" if position else "rgb", 0, ridge, mlp, parts["fg_iou"], parts["class_acc_on_fg"])


def backbone_from_checkpoint(backbone: Backbone, checkpoint: str | Path) -> Backbone:
    """``backbone`` with the EMA weights of a ``python -m diffseg_utils.toy.train`` checkpoint.

    The toy SD's ``unet*.pt`` hold the UNet's and the text encoder's (``ema = {"unet", "text"}``); the pixel
    DDPM's ``ddpm*.pt`` and the MM-DiT's ``mmdit*.pt`` the denoiser's alone. VAE, tokenizer and scheduler
    are shared.
    """
    st = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(st, dict) or "ema" not in st or "step" not in st:
        raise ValueError(f"{checkpoint} is not a checkpoint of diffseg_utils.toy.train (no 'ema' weights)")
    ema = st["ema"]
    denoiser, text = copy.deepcopy(backbone.denoiser), None
    try:
        if "unet" in ema and "text" in ema:
            text = copy.deepcopy(backbone.text_encoder)
            denoiser.load_state_dict(ema["unet"])
            text.load_state_dict(ema["text"])
        else:
            denoiser.load_state_dict(ema)
    except RuntimeError as e:
        raise ValueError(f"{checkpoint} was trained with another model config than {backbone.name!r}: {e}") from None
    return backbone.with_denoiser(denoiser, name=f"{backbone.name} @ step {int(st['step'])}", text_encoder=text)


TARGETS = {
    "toy-shapes": {"vae_psnr_db": ">= 28", "prompt_fidelity": ">= 0.80", "probe_mlp": ">= 0.60", "probe_gap": ">= 0.25"},
    "toy-faces": {"samples_all_found": ">= 0.80", "probe_mlp": ">= 0.60", "probe_gap": ">= 0.15"},
}
"""The quality targets of the shipped toy models, per dataset they were trained on."""


def _met(value: float, target: str) -> bool:
    return value >= float(target.split()[-1])


def quality_report(backbone: Backbone, *, seed: int = 0, n_fidelity: int = 64, guidance_scale: float = 5.0,
                   num_steps: int = 25, n_samples: int = 64) -> dict | None:
    """The measured quality of a shipped toy model against its targets (:data:`TARGETS`), or None.

    Dispatches on ``backbone.dataset``: the toy SD ("toy-shapes") gets VAE PSNR, prompt fidelity
    (``n_fidelity`` guided generations judged by the shapes oracle) and the few-shot probe; the
    pixel DDPM ("toy-faces") gets sample plausibility (``n_samples`` samples judged by the faces
    oracle) and the probe. The probe (:func:`fewshot_probe`) runs on the trained and on an untrained
    UNet (each at its own place chosen on validation images) and on raw RGB (+ x, y for faces).
    Returns ``{"dataset", "rows": [(name, value, target or None, met or None)], "probes": {...}}``;
    None for any other backbone (real checkpoints have no such gates).
    """
    from ..loading import untrained_like
    from ..registry import DATA_DIR

    world = {"toy-shapes": "shapes", "toy-faces": "faces"}.get(getattr(backbone, "dataset", None))
    if world is None:
        return None
    targets = TARGETS[backbone.dataset]
    rows = []
    if world == "shapes":
        from .oracle import OracleSegmenter

        rows.append(("vae_psnr_db", reconstruction_psnr(backbone, n=64)))
        fid = prompt_fidelity(backbone, OracleSegmenter.load(DATA_DIR / "oracle", device=backbone.device),
                              n=n_fidelity, guidance_scale=guidance_scale, num_steps=num_steps, seed=seed)
        rows += [("prompt_fidelity", fid["all_found"]), ("object_hit_rate", fid["object_hit_rate"])]
        kw: dict = {"seed": seed}
    else:
        from .gates import sample_plausibility
        from .oracle import OracleSegmenter

        plaus = sample_plausibility(backbone, OracleSegmenter.load(DATA_DIR / "oracle-faces", device=backbone.device),
                                    n=n_samples, seed=seed)
        rows.append(("samples_all_found", plaus["all_found"]))
        kw = {"seed": seed, "world": "faces", "timesteps": (25, 50, 150)}
    probes = {"trained": fewshot_probe(backbone, **kw), "untrained": fewshot_probe(untrained_like(backbone, seed), **kw),
              "raw RGB": fewshot_probe_rgb(seed=seed, world=world, size=backbone.resolution)}
    if world == "faces":
        probes["raw RGB + position"] = fewshot_probe_rgb(seed=seed, world=world, size=backbone.resolution, position=True)
    rows += [("probe_mlp", probes["trained"].mlp), ("probe_gap", probes["trained"].mlp - probes["untrained"].mlp)]
    return {"dataset": backbone.dataset, "probes": probes,
            "rows": [(k, float(v), targets.get(k), _met(v, targets[k]) if k in targets else None) for k, v in rows]}
