"""Grounded Diffusion's data pipeline: prompts, generation, segmenter labels, resumable shards.

The paper trains its grounding module on images it generates itself: a prompt names one or
two seen classes ("a photograph of a {c1}" / "... of a {c1} and a {c2}"), the UNet features
are taken in the same denoising pass, and an off-the-shelf detector labels the image with
the top-scoring instance per prompted class. A class the detector misses gets *no* loss term
(``valid=False``), never an empty-mask negative ("training without zero masks").

>>> bb = load_backbone("toy")
>>> labeler = SegmenterLabeler(OracleSegmenter.load("data/oracle"))
>>> synthesize(bb, labeler, "results/grounding-data", num_samples=1000, class_names=SEEN_CATEGORIES)
>>> data = GroundingShards("results/grounding-data")      # len(data), data.features[16], data.masks, ...

On disk (``out_dir``)::

    manifest.json        the settings; resuming with different ones is an error
    shard_00000.pt       samples [0, shard_size), written atomically (temp file + rename)
    shard_00001.pt       ...
    index.json           shards and sample counts, written after all shards exist (:func:`write_index`)

A shard is a ``torch.save`` dict (n = its sample count, M = :data:`MAX_CLASSES`)::

    images     (n, 3, R, R) uint8
    features   {resolution: (n, C_r, r, r) float16}   ({} when keep_features=False)
    names      n lists of the prompted class names
    class_ids  (n, M) int64, an index into the manifest's ``class_names`` (0-based); -1 = padding
               (so a label-map value for these classes would be ``class_id + 1``)
    masks      (n, M, H, W) bool   one mask per prompted class
    valid      (n, M) bool         False for padding and for classes the labeler missed
    prompts    n strings;  seeds (n,) int64 generation seeds;  indices (n,) int64 sample indices
    timestep   int, the UNet timestep the features were taken at
    shard, rank, world_size        which shard this is and which process wrote it

Multi-process synthesis (each process its own shards) is in :mod:`.synth`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import Backbone
from .features import GeneratedBatch, generate_with_features

MAX_CLASSES = 2
"""Classes named per prompt at most (the paper's one- and two-class prompts); the M in (n, M, H, W)."""

DEFAULT_TEMPLATE = "a photograph of a {}"
MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT_VERSION = 1
SYNTH_COMMAND = "python -m diffseg_utils.grounding.synth"
_PROMPT_STREAM = 0x9E0C  # keeps the prompt RNG apart from any other use of (seed, index)


# ---------------------------------------------------------------------------- prompts and seeds
def sample_prompt(class_names: Sequence[str], index: int, seed: int = 0, template: str = DEFAULT_TEMPLATE,
                  two_prob: float = 0.5) -> tuple[str, list[str]]:
    """The prompt of sample ``index`` and the class names it mentions.

    One class, or with probability ``two_prob`` two distinct ones (when there are two to pick):
    ``template.format("c1")`` or ``template.format("c1 and a c2")``, i.e. with the default
    template "a photograph of a c1" / "a photograph of a c1 and a c2" (the paper's prompts).
    Each sample has its own RNG seeded by ``(seed, index)``: the same for any batching or
    number of processes.
    """
    if not class_names:
        raise ValueError("class_names is empty: prompts need at least one class")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index, _PROMPT_STREAM])
    k = 2 if len(class_names) >= 2 and rng.random() < two_prob else 1
    names = [str(class_names[i]) for i in rng.choice(len(class_names), size=k, replace=False)]
    return template.format(" and a ".join(names)), names


def sample_seed(seed: int, index: int) -> int:
    """The generation (initial-noise) seed of sample ``index``: depends on nothing else."""
    return seed * 1_000_003 + index


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (same layout)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------- labelers
class Labeler(Protocol):
    """Labels a generated batch: one mask per prompted class.

    ``__call__(batch, names) -> (masks (N, M, H, W) bool, valid (N, M) bool)`` with M =
    :data:`MAX_CLASSES`; entry ``j`` of sample ``i`` is for ``names[i][j]``, padding and missed
    classes have ``valid=False``. A labeler may look at ``batch.images`` (a segmenter) or
    ``batch.features`` (the trained grounding module). An optional ``config`` dict (JSON)
    goes into the manifest, so resuming with another labeler is caught.
    """

    def __call__(self, batch: GeneratedBatch, names: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]: ...


def weights_fingerprint(*modules) -> str:
    """A short hash of the modules' floating-point weights (names, shapes, rounded sums), recorded in
    manifests so that a dataset made with other weights is refused rather than silently reused."""
    h = hashlib.sha1()
    for m in modules:
        for name, p in (m.state_dict().items() if isinstance(m, torch.nn.Module) else ()):
            if torch.is_floating_point(p):
                d = p.detach().double()
                h.update(f"{name}{tuple(p.shape)}{float(d.sum()):.6g}{float((d * d).sum()):.6g}".encode())
    return h.hexdigest()[:12]


def labeler_config(labeler: Labeler) -> dict[str, Any]:
    """What the manifest records about a labeler: its ``config`` dict (else its name), plus a
    fingerprint of its weights when it wraps a torch module (``module`` or ``segmenter``)."""
    cfg = getattr(labeler, "config", None)
    if cfg is None:
        cfg = {"name": getattr(labeler, "__name__", type(labeler).__name__)}
    nets = [getattr(labeler, a, None) for a in ("module", "segmenter")]
    if any(isinstance(n, torch.nn.Module) for n in nets):
        cfg = {**cfg, "weights": weights_fingerprint(*nets)}
    return json.loads(json.dumps(cfg))


_SEGMENTER_NAMES = {"OracleSegmenter": "oracle"}  # default labeler names, as the synth CLI's --labeler


class SegmenterLabeler:
    """Labels from a segmenter / detector: the top-scoring mask of each prompted class.

    ``segmenter(images (N, 3, H, W) in [-1, 1])`` returns an object with ``masks`` (N, K, H', W')
    bool, ``scores`` (N, K) and ``class_names`` (K names; a detector may repeat a name once per
    instance) -- :class:`~diffseg_utils.toy.oracle.SegmenterOutput`. A prompted class that is
    not among ``class_names``, scores below ``min_score`` or has an empty mask gets
    ``valid=False`` (the paper: Mask R-CNN, score >= 0.05, no loss for missed classes).
    Masks are resized (nearest) to the image size when the segmenter's differ.
    """

    def __init__(self, segmenter, min_score: float = 0.05, name: str | None = None):
        self.segmenter = segmenter
        self.min_score = float(min_score)
        name = name or _SEGMENTER_NAMES.get(type(segmenter).__name__, type(segmenter).__name__)
        self.config = {"name": name, "min_score": self.min_score}

    def __repr__(self) -> str:
        return f"SegmenterLabeler({self.config['name']}, min_score={self.min_score})"

    @torch.no_grad()
    def __call__(self, batch: GeneratedBatch, names: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.segmenter(batch.images)
        n, _, h, w = batch.images.shape
        seg_masks = out.masks.bool()
        if seg_masks.shape[-2:] != (h, w):
            seg_masks = F.interpolate(seg_masks.float(), size=(h, w), mode="nearest").bool()
        seg_masks, scores = seg_masks.cpu(), out.scores.float().cpu()
        seg_names = list(out.class_names)
        masks = torch.zeros(n, MAX_CLASSES, h, w, dtype=torch.bool)
        valid = torch.zeros(n, MAX_CLASSES, dtype=torch.bool)
        for i, sample_names in enumerate(names):
            for j, name in enumerate(sample_names):
                ks = [k for k, c in enumerate(seg_names) if c == name]
                if not ks:
                    continue  # the segmenter does not know this class: no label, no loss
                k = ks[int(scores[i, ks].argmax())]
                if scores[i, k] >= self.min_score and seg_masks[i, k].any():
                    masks[i, j] = seg_masks[i, k]
                    valid[i, j] = True
        return masks, valid


# ---------------------------------------------------------------------------- synthesis
def _manifest(backbone: Backbone, labeler: Labeler, **settings) -> dict[str, Any]:
    cfg = {"format_version": FORMAT_VERSION, "backbone": backbone.name,
           "backbone_weights": weights_fingerprint(backbone.unet, backbone.text_encoder), **settings,
           "labeler": labeler_config(labeler)}
    return json.loads(json.dumps(cfg))  # tuples -> lists, as they read back


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def resume_command(out_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The :mod:`.synth` command line that regenerates missing shards of ``out_dir``."""
    m, lab = manifest, manifest["labeler"]
    cmd = (f"{SYNTH_COMMAND} --out {out_dir} --backbone {m['backbone']} --num-samples {m['num_samples']} "
           f"--shard-size {m['shard_size']} --seed {m['seed']} --num-steps {m['num_steps']} "
           f"--guidance {m['guidance']} --feature-step {m['feature_step']} --classes {','.join(m['class_names'])} "
           f"--labeler {lab.get('name', '?')}")
    if lab.get("min_score", 0.05) != 0.05:
        cmd += f" --min-score {lab['min_score']}"
    if m.get("template", DEFAULT_TEMPLATE) != DEFAULT_TEMPLATE:
        cmd += f" --template {json.dumps(m['template'])}"
    if m.get("two_prob", 0.5) != 0.5:
        cmd += f" --two-prob {m['two_prob']}"
    if not m.get("keep_features", True):
        cmd += " --no-features"
    return cmd + "  (or call synthesize(...) again with the settings in manifest.json)"


def _check_or_write_manifest(out_dir: Path, cfg: dict[str, Any], write: bool) -> None:
    path = out_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} in the manifest, {v!r} now" for k, v in cfg.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out_dir} holds a dataset synthesised with other settings ({path}):\n  "
                             + "\n  ".join(diff) + "\nUse a new output directory, or rerun with the manifest's "
                             f"settings to resume it:\n  {resume_command(out_dir, old)}")
        return
    if any(out_dir.glob("shard_*.pt")):
        raise ValueError(f"{out_dir} holds shards but no {MANIFEST}, so their settings are unknown; "
                         "use a new output directory (or delete the shards)")
    if write:
        _atomic_write_text(path, json.dumps(cfg, indent=1))


def shard_path(out_dir: str | Path, k: int) -> Path:
    return Path(out_dir) / f"shard_{k:05d}.pt"


def num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


def synthesize(
    backbone: Backbone,
    labeler: Labeler,
    out_dir: str | Path,
    *,
    num_samples: int,
    class_names: Sequence[str],
    shard_size: int = 64,
    seed: int = 0,
    num_steps: int = 50,
    guidance: float = 5.0,
    feature_step: int = -1,
    batch_size: int = 16,
    keep_features: bool = True,
    template: str = DEFAULT_TEMPLATE,
    two_prob: float = 0.5,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Generate, label and save this process's shards of a grounding dataset; returns their paths.

    Shard ``k`` holds samples ``[k * shard_size, (k + 1) * shard_size)`` (the last one shorter)
    and process ``rank`` of ``world_size`` writes the shards with ``k % world_size == rank``.
    A sample's prompt and noise depend only on ``(seed, index)`` (:func:`sample_prompt`,
    :func:`sample_seed`), so the data is the same for any ``batch_size`` and ``world_size``.
    Existing shards are skipped: rerun after an interruption to finish. Rank 0 writes
    ``manifest.json``; every rank refuses a directory whose manifest has other settings.
    ``batch_size`` bounds one generation call; batches never cross shards.
    """
    out_dir = Path(out_dir)
    class_names = [str(c) for c in class_names]
    if num_samples < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"num_samples, shard_size and batch_size must be >= 1, got {num_samples}, {shard_size}, "
                         f"{batch_size}")
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be non-empty and distinct, got {class_names}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if not -num_steps <= feature_step < num_steps:
        raise ValueError(f"feature_step must be in [-{num_steps}, {num_steps - 1}], got {feature_step}")
    cfg = _manifest(backbone, labeler, num_samples=num_samples, shard_size=shard_size, seed=seed,
                    num_steps=num_steps, guidance=float(guidance), feature_step=feature_step,
                    class_names=class_names, template=template, two_prob=float(two_prob),
                    keep_features=keep_features)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_manifest(out_dir, cfg, write=rank == 0)

    total = num_shards(num_samples, shard_size)
    if rank == 0 and not all(shard_path(out_dir, k).exists() for k in range(total)):
        (out_dir / INDEX).unlink(missing_ok=True)  # stale until write_index() runs again
    mine = [k for k in range(total) if k % world_size == rank]
    todo = [k for k in mine if not shard_path(out_dir, k).exists()]
    bar = tqdm(todo, desc=f"shards (rank {rank})" if world_size > 1 else "shards", disable=not progress,
               position=rank)
    for k in bar:
        lo, hi = k * shard_size, min((k + 1) * shard_size, num_samples)
        parts = [_generate_and_label(backbone, labeler, range(s, min(s + batch_size, hi)), class_names, seed,
                                     num_steps, guidance, feature_step, template, two_prob, keep_features)
                 for s in range(lo, hi, batch_size)]
        shard = _concat(parts)
        shard.update(shard=k, rank=rank, world_size=world_size)
        _save_shard(shard, shard_path(out_dir, k))
    return [shard_path(out_dir, k) for k in mine]


def _generate_and_label(backbone, labeler, indices: range, class_names, seed, num_steps, guidance, feature_step,
                        template, two_prob, keep_features) -> dict[str, Any]:
    drawn = [sample_prompt(class_names, i, seed, template, two_prob) for i in indices]
    prompts, names = [p for p, _ in drawn], [ns for _, ns in drawn]
    if any(len(ns) > MAX_CLASSES for ns in names):
        raise ValueError(f"a prompt names more than MAX_CLASSES={MAX_CLASSES} classes")
    seeds = [sample_seed(seed, i) for i in indices]
    gb = generate_with_features(backbone, prompts, num_steps=num_steps, guidance=guidance, seed=seeds,
                                feature_step=feature_step)
    masks, valid = labeler(gb, names)
    n, (h, w) = len(prompts), gb.images.shape[-2:]
    if tuple(masks.shape) != (n, MAX_CLASSES, h, w) or tuple(valid.shape) != (n, MAX_CLASSES):
        raise ValueError(f"labeler {labeler!r} returned masks {tuple(masks.shape)} and valid {tuple(valid.shape)}; "
                         f"expected ({n}, {MAX_CLASSES}, {h}, {w}) and ({n}, {MAX_CLASSES})")
    class_ids = torch.full((n, MAX_CLASSES), -1, dtype=torch.long)
    for i, ns in enumerate(names):
        class_ids[i, :len(ns)] = torch.tensor([class_names.index(c) for c in ns])
    return {
        "images": to_uint8(gb.images).cpu(),
        "features": {r: f.cpu() for r, f in gb.features.items()} if keep_features else {},
        "names": names,
        "class_ids": class_ids,
        "masks": masks.bool().cpu(),
        "valid": valid.bool().cpu() & (class_ids >= 0),  # padding is never a label
        "prompts": prompts,
        "seeds": torch.tensor(seeds, dtype=torch.long),
        "indices": torch.tensor(list(indices), dtype=torch.long),
        "timestep": gb.timestep,
    }


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in parts[0].items():
        if isinstance(v, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])
        elif isinstance(v, list):
            out[key] = [x for p in parts for x in p[key]]
        elif isinstance(v, dict):
            out[key] = {r: torch.cat([p[key][r] for p in parts]) for r in v}
        else:
            out[key] = v
    return out


def _save_shard(shard: dict[str, Any], path: Path) -> None:
    # only this rank writes shard k, so its stale temp files (an earlier crash) are ours to remove
    for stale in path.parent.glob(f"{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(shard, tmp)
    os.replace(tmp, path)  # a shard_*.pt that exists is complete


# ---------------------------------------------------------------------------- reading
def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: not a grounding dataset; create one with "
                                f"synthesize(...) or `{SYNTH_COMMAND} --out {out_dir} ...`")
    return json.loads(path.read_text())


def _load_shard(path: Path, features: bool = True) -> dict[str, Any]:
    shard = torch.load(path, map_location="cpu", weights_only=True, mmap=not features)
    if not features:
        shard["features"] = {}
    return shard


class MissingShardsError(FileNotFoundError):
    """Some shards of a grounding dataset are not on disk (an interrupted or unfinished synthesis)."""


class GroundingShards:
    """A synthesised grounding dataset read back from ``out_dir`` (all shards or a subset).

    Tensors are concatenated over the loaded shards in sample order: ``images`` (N, 3, R, R)
    uint8, ``features`` {res: (N, C, r, r) fp16}, ``masks`` (N, M, H, W) bool, ``valid``
    (N, M) bool, ``class_ids`` (N, M) long (-1 = padding, else an index into ``class_names``),
    ``names``, ``prompts``, ``seeds``, ``indices``, ``ranks`` (which process wrote each sample).
    ``features=False`` skips the (large) features. ``data[i]`` is one sample as a dict.
    """

    def __init__(self, out_dir: str | Path, shards: Sequence[int] | None = None, features: bool = True):
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir)
        self.load_features = features
        total = num_shards(self.manifest["num_samples"], self.manifest["shard_size"])
        self.shards = list(range(total)) if shards is None else sorted(shards)
        bad = [k for k in self.shards if not 0 <= k < total]
        if bad:
            raise ValueError(f"shards {bad} out of range: this dataset has {total} (0..{total - 1})")
        missing = [k for k in self.shards if not shard_path(self.out_dir, k).exists()]
        if missing:
            raise MissingShardsError(
                f"{len(missing)} of {len(self.shards)} shards missing in {self.out_dir}: "
                f"{', '.join(shard_path(self.out_dir, k).name for k in missing[:10])}"
                f"{' ...' if len(missing) > 10 else ''}. Resume the synthesis (existing shards are kept):\n  "
                f"{resume_command(self.out_dir, self.manifest)}")
        loaded = [_load_shard(shard_path(self.out_dir, k), features) for k in self.shards]
        for s in loaded:
            s["ranks"] = torch.full((len(s["prompts"]),), s["rank"], dtype=torch.long)
        d = _concat(loaded) if loaded else {}
        self.images: torch.Tensor = d.get("images")
        self.features: dict[int, torch.Tensor] = d.get("features", {})
        self.masks: torch.Tensor = d.get("masks")
        self.valid: torch.Tensor = d.get("valid")
        self.class_ids: torch.Tensor = d.get("class_ids")
        self.names: list[list[str]] = d.get("names", [])
        self.prompts: list[str] = d.get("prompts", [])
        self.seeds: torch.Tensor = d.get("seeds")
        self.indices: torch.Tensor = d.get("indices")
        self.ranks: torch.Tensor = d.get("ranks")
        self.timestep: int | None = d.get("timestep")

    def __repr__(self) -> str:
        return (f"GroundingShards({str(self.out_dir)!r}, {len(self)} samples, {len(self.shards)} shards, "
                f"features={sorted(self.features)})")

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "features": {r: f[i] for r, f in self.features.items()},
                "masks": self.masks[i], "valid": self.valid[i], "class_ids": self.class_ids[i],
                "names": self.names[i], "prompt": self.prompts[i], "seed": int(self.seeds[i]),
                "index": int(self.indices[i])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def index_masks(self) -> torch.Tensor:
        """(N, H, W) int64 label maps: 0 = background, ``k`` = ``class_names[k - 1]`` (valid masks only).

        Where two valid masks overlap the first prompted class keeps the pixel. A class the
        labeler missed is simply absent (its pixels read as background): drop such images
        with ``data.valid[:, :len(names)]`` if that matters.
        """
        out = torch.zeros(len(self), *self.masks.shape[-2:], dtype=torch.long)
        for j in reversed(range(self.masks.shape[1])):  # reversed: the first class is painted last
            m = self.masks[:, j] & self.valid[:, j, None, None]
            out = torch.where(m, self.class_ids[:, j, None, None] + 1, out)
        return out


def write_index(out_dir: str | Path) -> dict[str, Any]:
    """Check that every shard exists and is consistent, then write ``index.json``; returns it.

    Lists each shard's file, sample count, index range and writer rank, plus per-class counts
    of prompted and labelled (valid) samples.
    """
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    total = num_shards(m["num_samples"], m["shard_size"])
    missing = [k for k in range(total) if not shard_path(out_dir, k).exists()]
    if missing:
        raise MissingShardsError(f"shards {missing[:10]}{' ...' if len(missing) > 10 else ''} missing in {out_dir}; "
                                 f"resume with:\n  {resume_command(out_dir, m)}")
    prompted = dict.fromkeys(m["class_names"], 0)
    labelled = dict.fromkeys(m["class_names"], 0)
    shards = []
    for k in range(total):
        s = _load_shard(shard_path(out_dir, k), features=False)
        lo, hi = k * m["shard_size"], min((k + 1) * m["shard_size"], m["num_samples"])
        if s["indices"].tolist() != list(range(lo, hi)):
            raise ValueError(f"{shard_path(out_dir, k)} holds samples {s['indices'].tolist()[:5]}..., expected "
                             f"{lo}..{hi - 1}: delete it and resume with:\n  {resume_command(out_dir, m)}")
        for ns, v in zip(s["names"], s["valid"].tolist()):
            for j, c in enumerate(ns):
                prompted[c] += 1
                labelled[c] += int(v[j])
        shards.append({"file": shard_path(out_dir, k).name, "num_samples": hi - lo, "first_index": lo,
                       "rank": s["rank"], "world_size": s["world_size"]})
    index = {"num_samples": m["num_samples"], "num_shards": total, "shards": shards,
             "prompted_per_class": prompted, "labelled_per_class": labelled}
    _atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1))
    return index


# ---------------------------------------------------------------------------- segmentation export
def export_segmentation_dataset(out_dir: str | Path, images, index_masks, class_names: Sequence[str]) -> Path:
    """Write an image/label-map dataset: ``images/00000.png``, ``masks/00000.png``, ``classes.json``.

    images:      (N, 3, H, W) or (N, H, W, 3) uint8 (numpy or torch)
    index_masks: (N, H, W) ints, 0 = background, ``k`` = ``class_names[k - 1]``, 255 = ignore;
                 saved as palette PNGs (pixel value = class index, colours only for viewing)
    """
    from PIL import Image

    imgs = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    labs = np.asarray(index_masks.cpu() if isinstance(index_masks, torch.Tensor) else index_masks)
    if imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {imgs.dtype}; convert [-1, 1] tensors with to_uint8(...)")
    if imgs.ndim == 4 and imgs.shape[1] == 3 and imgs.shape[-1] != 3:
        imgs = imgs.transpose(0, 2, 3, 1)
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) or (N, H, W, 3), got {imgs.shape}")
    if labs.shape != imgs.shape[:3]:
        raise ValueError(f"index_masks {labs.shape} do not match images {imgs.shape[:3]} (N, H, W)")
    k = len(class_names)
    if k > 254:
        raise ValueError(f"{k} classes do not fit an 8-bit PNG with 0 = background and 255 = ignore")
    bad = (labs != 255) & ((labs < 0) | (labs > k))
    if bad.any():
        raise ValueError(f"index_masks hold values {np.unique(labs[bad])[:5]} outside 0..{k} (and 255 = ignore)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    palette = _palette()
    for i, (img, lab) in enumerate(zip(imgs, labs)):
        Image.fromarray(np.ascontiguousarray(img)).save(out / "images" / f"{i:05d}.png")
        p = Image.fromarray(lab.astype(np.uint8))
        p.putpalette(palette)  # an 8-bit image with a palette becomes mode "P"; values are kept
        p.save(out / "masks" / f"{i:05d}.png")
    (out / "classes.json").write_text(json.dumps(
        {"class_names": list(class_names), "background": 0, "ignore_index": 255,
         "note": "mask pixel k = class_names[k - 1]; 0 = background; 255 = ignore"}, indent=1))
    return out


def _palette() -> list[int]:
    rng = np.random.default_rng(0)
    pal = rng.integers(40, 256, size=(256, 3))
    pal[0], pal[255] = 0, 255
    return pal.astype(np.uint8).ravel().tolist()


def load_segmentation_dataset(root: str | Path):
    """Read :func:`export_segmentation_dataset`'s layout back.

    Returns ``(split, class_names)``: a :class:`~diffseg_utils.datasets.SegmentationSplit`
    (images (N, H, W, 3) uint8, labels (N, H, W) int64, file stems) and the class names
    (label ``k`` = ``class_names[k - 1]``).
    """
    from PIL import Image

    from ..datasets import SegmentationSplit

    root = Path(root)
    if not (root / "classes.json").exists():
        raise FileNotFoundError(f"no classes.json in {root}; expected images/, masks/ and classes.json as written "
                                "by export_segmentation_dataset(...)")
    class_names = json.loads((root / "classes.json").read_text())["class_names"]
    files = sorted((root / "images").glob("*.png"))
    images, labels = [], []
    for f in files:
        mf = root / "masks" / f.name
        if not mf.exists():
            raise FileNotFoundError(f"mask {mf} missing for image {f}")
        images.append(np.asarray(Image.open(f).convert("RGB")))
        labels.append(np.asarray(Image.open(mf)).astype(np.int64))  # palette/L PNG: pixel = class index
    if not images:
        return SegmentationSplit(np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 0, 0), np.int64), []), class_names
    return SegmentationSplit(np.stack(images), np.stack(labels), [f.stem for f in files]), class_names
