"""Grounding datasets on disk: synthesis into resumable shards, and reading them back lazily.

The paper trains its grounding module on images it generates itself: a prompt names one or
two seen classes (the backbone's template, e.g. "a photograph of a {c1}" / "... of a {c1} and a
{c2}"), the UNet features are taken in the same denoising pass, and a labeler (an off-the-shelf
detector) labels the image with the top-scoring instance per prompted class.

>>> bb = load_backbone("toy")
>>> labeler = SegmenterLabeler(my_detector, name="my-detector")
>>> synthesize(bb, labeler, "results/grounding-data", num_samples=1000, class_names=SEEN)
>>> data = GroundingShards("results/grounding-data")   # len(data), data.batch(idx), data.class_ids, ...

On disk (``out_dir``)::

    manifest.json        the settings (prompt template included); resuming with other ones is an error
    shard_00000.pt       samples [0, shard_size), written atomically (temp file + rename)
    shard_00001.pt       ...
    index.json           shards and sample counts, written after all shards exist (:func:`write_index`)

A shard is a ``torch.save`` dict (n = its sample count, M = :data:`~.prompts.MAX_CLASSES`)::

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

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone
from .features import generate_with_features
from .labelers import Labeler, labeler_config, weights_fingerprint
from .prompts import MAX_CLASSES, check_template, prompt_template, sample_prompt, sample_seed

MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT_VERSION = 1
SYNTH_COMMAND = "python -m diffseg_utils.grounding.synth"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (same layout)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------- manifest
def _manifest(backbone: Backbone, labeler: Labeler, **settings) -> dict[str, Any]:
    cfg = {"format_version": FORMAT_VERSION, "backbone": backbone.name,
           "backbone_weights": weights_fingerprint(backbone.denoiser, backbone.text_encoder), **settings,
           "labeler": labeler_config(labeler)}
    return json.loads(json.dumps(cfg))  # tuples -> lists, as they read back


def _temp_beside(path: Path) -> Path:
    """A fresh temporary file next to ``path`` (unique across processes and threads)."""
    fd, name = tempfile.mkstemp(prefix=f"{path.name}.tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _create_exclusive(path: Path, text: str) -> None:
    """Write ``path`` only if it does not exist, atomically: ``FileExistsError`` when another process won."""
    tmp = _temp_beside(path)
    try:
        tmp.write_text(text)
        os.link(tmp, path)  # fails if path exists; readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)


def resume_command(out_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The :mod:`.synth` command line that regenerates missing shards of ``out_dir``."""
    m, lab = manifest, manifest["labeler"]
    cmd = (f"{SYNTH_COMMAND} --out {out_dir} --backbone {m['backbone']} --num-samples {m['num_samples']} "
           f"--shard-size {m['shard_size']} --seed {m['seed']} --num-steps {m['num_steps']} "
           f"--guidance-scale {m['guidance']} --feature-step {m['feature_step']} --classes {','.join(m['class_names'])} "
           f"--labeler {lab.get('name', '?')} --template {json.dumps(m.get('template'))}")
    if lab.get("min_score", 0.05) != 0.05:
        cmd += f" --min-score {lab['min_score']}"
    if m.get("two_prob", 0.5) != 0.5:
        cmd += f" --two-prob {m['two_prob']}"
    if not m.get("keep_features", True):
        cmd += " --no-features"
    return cmd + "  (or call synthesize(...) again with the settings in manifest.json)"


def _check_or_write_manifest(out_dir: Path, cfg: dict[str, Any], write: bool) -> None:
    path = out_dir / MANIFEST
    if not path.exists() and any(out_dir.glob("shard_*.pt")):
        raise ValueError(f"{out_dir} holds shards but no {MANIFEST}, so their settings are unknown; "
                         "use a new output directory (or delete the shards)")
    if write:
        try:
            _create_exclusive(path, json.dumps(cfg, indent=1))
            return
        except FileExistsError:
            pass  # written before, or by a concurrent run: compare with it
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} in the manifest, {v!r} now" for k, v in cfg.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out_dir} holds a dataset synthesised with other settings ({path}):\n  "
                             + "\n  ".join(diff) + "\nUse a new output directory, or rerun with the manifest's "
                             f"settings to resume it:\n  {resume_command(out_dir, old)}")
        return


def _wait_for_manifest(out_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (out_dir / MANIFEST).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not write {out_dir / MANIFEST} within {timeout:.0f} s; start rank 0 "
                               "(it writes the manifest before any rank writes a shard) or pass barrier=")
        time.sleep(0.2)


def shard_path(out_dir: str | Path, k: int) -> Path:
    return Path(out_dir) / f"shard_{k:05d}.pt"


def num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


# ---------------------------------------------------------------------------- synthesis
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
    guidance_scale: float = 5.0,
    feature_step: int = -1,
    batch_size: int = 16,
    keep_features: bool = True,
    template: str | None = None,
    two_prob: float = 0.5,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], Any] | None = None,
    manifest_timeout: float = 600.0,
    progress: bool = True,
) -> list[Path]:
    """Generate, label and save this process's shards of a grounding dataset; returns their paths.

    Shard ``k`` holds samples ``[k * shard_size, (k + 1) * shard_size)`` (the last one shorter)
    and process ``rank`` of ``world_size`` writes the shards with ``k % world_size == rank``.
    A sample's prompt and noise depend only on ``(seed, index)`` (:func:`~.prompts.sample_prompt`,
    :func:`~.prompts.sample_seed`), so the data is the same for any ``batch_size`` and
    ``world_size``. ``template`` defaults to the backbone's (:func:`~.prompts.prompt_template`);
    it is recorded in the manifest, so data made with another template is refused.

    Order of writes with several processes: rank 0 checks (or writes) ``manifest.json`` first,
    then ``barrier()`` (e.g. ``accelerate.PartialState().wait_for_everyone``) is called by every
    rank; without a barrier the other ranks wait up to ``manifest_timeout`` seconds for the
    manifest to appear. Only then does any rank check the manifest and write shards, so a shard
    never exists without its manifest. Existing shards are skipped: rerun after an interruption
    to finish. ``batch_size`` bounds one generation call; batches never cross shards.
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
    template = prompt_template(backbone) if template is None else check_template(template)
    cfg = _manifest(backbone, labeler, num_samples=num_samples, shard_size=shard_size, seed=seed,
                    num_steps=num_steps, guidance=float(guidance_scale), feature_step=feature_step,
                    class_names=class_names, template=template, two_prob=float(two_prob),
                    keep_features=keep_features)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = num_shards(num_samples, shard_size)
    if rank == 0:
        _check_or_write_manifest(out_dir, cfg, write=True)
        if not all(shard_path(out_dir, k).exists() for k in range(total)):
            (out_dir / INDEX).unlink(missing_ok=True)  # stale until write_index() runs again
    if barrier is not None:
        barrier()
    elif rank != 0:
        _wait_for_manifest(out_dir, manifest_timeout)
    if rank != 0:
        _check_or_write_manifest(out_dir, cfg, write=False)

    mine = [k for k in range(total) if k % world_size == rank]
    todo = [k for k in mine if not shard_path(out_dir, k).exists()]
    bar = tqdm(todo, desc=f"shards (rank {rank})" if world_size > 1 else "shards", disable=not progress,
               position=rank)
    for k in bar:
        lo, hi = k * shard_size, min((k + 1) * shard_size, num_samples)
        parts = [_generate_and_label(backbone, labeler, range(s, min(s + batch_size, hi)), class_names, seed,
                                     num_steps, guidance_scale, feature_step, template, two_prob, keep_features)
                 for s in range(lo, hi, batch_size)]
        shard = _concat(parts)
        shard.update(shard=k, rank=rank, world_size=world_size)
        _save_shard(shard, shard_path(out_dir, k))
    return [shard_path(out_dir, k) for k in mine]


def _generate_and_label(backbone, labeler, indices: range, class_names, seed, num_steps, guidance_scale, feature_step,
                        template, two_prob, keep_features) -> dict[str, Any]:
    drawn = [sample_prompt(class_names, i, seed, template, two_prob) for i in indices]
    prompts, names = [p for p, _ in drawn], [ns for _, ns in drawn]
    if any(len(ns) > MAX_CLASSES for ns in names):
        raise ValueError(f"a prompt names more than MAX_CLASSES={MAX_CLASSES} classes")
    seeds = [sample_seed(seed, i) for i in indices]
    gb = generate_with_features(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seeds,
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
    # a temp name of its own: two runs writing the same shard never touch each other's file
    tmp = _temp_beside(path)
    try:
        torch.save(shard, tmp)
        os.replace(tmp, path)  # a shard_*.pt that exists is complete
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- reading
def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: not a grounding dataset; create one with "
                                f"synthesize(...) or `{SYNTH_COMMAND} --out {out_dir} ...`")
    return json.loads(path.read_text())


def _load_shard(path: Path, features: bool = True) -> dict[str, Any]:
    # memory-mapped: tensors are views of the file, read from disk only where indexed
    shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not features:
        shard["features"] = {}
    return shard


class MissingShardsError(FileNotFoundError):
    """Some shards of a grounding dataset are not on disk (an interrupted or unfinished synthesis)."""


class GroundingShards:
    """A synthesised grounding dataset read back from ``out_dir`` (all shards or a subset), lazily.

    Each shard file is memory-mapped, not read: images, masks and features stay on disk until
    indexed, so a dataset far larger than RAM (SD features: about 25 MB per sample) can be
    trained on. Use :meth:`batch` (rows gathered across shards) or ``data[i]``.

    Small per-sample fields are held in memory, concatenated in sample order: ``valid`` (N, M)
    bool, ``class_ids`` (N, M) long (-1 = padding, else an index into ``class_names``),
    ``names``, ``prompts``, ``seeds``, ``indices``, ``ranks`` (which process wrote each sample).
    The properties ``images`` (N, 3, R, R) uint8, ``masks`` (N, M, H, W) bool and ``features``
    {res: (N, C, r, r) fp16} concatenate *every* shard into memory on each access: fine for small
    sets, use :meth:`batch` for large ones. ``features=False`` drops the features.
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
        self._parts = [_load_shard(shard_path(self.out_dir, k), features) for k in self.shards]
        sizes = [len(s["prompts"]) for s in self._parts]
        self._starts = torch.tensor([0] + sizes).cumsum(0)            # (S + 1,) first sample of each shard
        small = [{k: s[k] for k in ("valid", "class_ids", "names", "prompts", "seeds", "indices")} for s in self._parts]
        for s, part in zip(small, self._parts):
            s["ranks"] = torch.full((len(part["prompts"]),), part["rank"], dtype=torch.long)
        d = _concat(small) if small else {}
        # copies: independent of the mapped files
        self.valid: torch.Tensor = d["valid"].clone() if d else None
        self.class_ids: torch.Tensor = d["class_ids"].clone() if d else None
        self.names: list[list[str]] = d.get("names", [])
        self.prompts: list[str] = d.get("prompts", [])
        self.seeds: torch.Tensor = d["seeds"].clone() if d else None
        self.indices: torch.Tensor = d["indices"].clone() if d else None
        self.ranks: torch.Tensor = d.get("ranks")
        self.timestep: int | None = self._parts[0]["timestep"] if self._parts else None

    def __repr__(self) -> str:
        res = sorted(self._parts[0]["features"]) if self._parts else []
        return (f"GroundingShards({str(self.out_dir)!r}, {len(self)} samples, {len(self.shards)} shards, "
                f"features={res})")

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def resolutions(self) -> list[int]:
        """Feature resolutions, lowest first ([] without features)."""
        return sorted(self._parts[0]["features"]) if self._parts else []

    def __len__(self) -> int:
        return len(self.prompts)

    # ---------------------------------------------------------------- whole-set views (load everything)
    @property
    def images(self) -> torch.Tensor:
        return torch.cat([s["images"] for s in self._parts])

    @property
    def masks(self) -> torch.Tensor:
        return torch.cat([s["masks"] for s in self._parts])

    @property
    def features(self) -> dict[int, torch.Tensor]:
        return {r: torch.cat([s["features"][r] for s in self._parts]) for r in self.resolutions}

    # ---------------------------------------------------------------- lazy access
    def _locate(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"sample indices must be in [-{n}, {n - 1}], got {idx.min().item()}..{idx.max().item()}")
        idx = idx % max(n, 1)
        part = torch.searchsorted(self._starts, idx, right=True) - 1
        return part, idx - self._starts[part]

    def _gather(self, get: Callable[[dict], torch.Tensor], part: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        first = get(self._parts[0])
        out = first.new_empty((len(part), *first.shape[1:]))
        for p in part.unique().tolist():
            sel = (part == p).nonzero().flatten()
            out[sel] = get(self._parts[p])[row[sel]]
        return out

    def batch(self, idx: Sequence[int] | torch.Tensor, device: torch.device | str | None = None,
              features: bool = True, images: bool = False) -> dict[str, Any]:
        """Samples ``idx`` (B indices, any order, repeats allowed) read from the mapped shards.

        Returns ``features`` {res: (B, C, r, r) fp16} (when kept and ``features=True``), ``masks``
        (B, M, H, W) bool, ``valid`` (B, M) bool, ``class_ids`` (B, M) long and, with
        ``images=True``, ``images`` (B, 3, R, R) uint8; on ``device`` (default CPU; to CUDA through
        pinned memory, asynchronously). Only the requested rows are read from disk.
        """
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        part, row = self._locate(idx)
        out: dict[str, Any] = {
            "masks": self._gather(lambda s: s["masks"], part, row),
            "valid": self.valid[idx], "class_ids": self.class_ids[idx]}
        if features:
            out["features"] = {r: self._gather(lambda s, r=r: s["features"][r], part, row) for r in self.resolutions}
        if images:
            out["images"] = self._gather(lambda s: s["images"], part, row)
        if device is not None:
            dev = torch.device(device)
            if dev.type == "cuda":  # page-locked, asynchronous: the copy overlaps the GPU's work on the last batch
                move = lambda t: t.pin_memory().to(dev, non_blocking=True)  # noqa: E731
            else:
                move = lambda t: t.to(dev)  # noqa: E731
            out = {k: ({r: move(f) for r, f in v.items()} if isinstance(v, dict) else move(v)) for k, v in out.items()}
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i %= n
        p = int(torch.searchsorted(self._starts, torch.tensor(i), right=True)) - 1
        s, j = self._parts[p], i - int(self._starts[p])
        return {"image": s["images"][j], "features": {r: f[j] for r, f in s["features"].items()},
                "masks": s["masks"][j], "valid": self.valid[i], "class_ids": self.class_ids[i],
                "names": self.names[i], "prompt": self.prompts[i], "seed": int(self.seeds[i]),
                "index": int(self.indices[i])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def index_masks(self) -> torch.Tensor:
        """(N, H, W) int64 label maps: 0 = background, ``k`` = ``class_names[k - 1]`` (valid masks only).

        Where two valid masks overlap the first prompted class keeps the pixel. A class the
        labeler missed is simply absent (its pixels read as background): drop such images
        with ``data.valid[:, :len(names)]`` if that matters. Built shard by shard.
        """
        outs = []
        for k, s in enumerate(self._parts):
            lo, hi = int(self._starts[k]), int(self._starts[k + 1])
            masks, valid, ids = s["masks"], self.valid[lo:hi], self.class_ids[lo:hi]
            out = torch.zeros(hi - lo, *masks.shape[-2:], dtype=torch.long)
            for j in reversed(range(masks.shape[1])):  # reversed: the first class is painted last
                m = masks[:, j] & valid[:, j, None, None]
                out = torch.where(m, ids[:, j, None, None] + 1, out)
            outs.append(out)
        return torch.cat(outs) if outs else torch.zeros(0, dtype=torch.long)


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
