"""DDPM-Seg's pixel classifier: an ensemble of small MLPs trained *together* as one batched model.

Member (from DatasetGAN, as DDPM-Seg uses it)::

    Linear(d, h1) - ReLU - BatchNorm(h1) - Linear(h1, h2) - ReLU - BatchNorm(h2) - Linear(h2, K)
    (h1, h2) = (128, 32) if K < 30 else (256, 128); weights ~ N(0, 0.02), biases 0

Each member has its own seed (initialisation and data order), its own BatchNorm statistics and
its own early stop, exactly as if trained alone with Adam — but all members share one matmul
per layer (``torch.baddbmm`` over a stacked weight), so 10 members cost little more than one.
A member that stops leaves the batch. The loop never synchronises with the device per step: it
reads the members' strike counts back only when one of them could have run out of patience.
Training pixels come from :meth:`FeatureMaps.sample`: interpolated once into a float32 table of
the *labelled* pixels when that fits in ``fit(cache_bytes=...)`` (1 GiB), else batch by batch;
the full (pixels x features) matrix of all images is never built.

Dtype and device: parameters and arithmetic are float32 whatever the features' storage dtype
(fp16 / bf16 maps are upcast when interpolated); the ensemble lives on the features' device
unless given one. Files: :meth:`PixelEnsemble.save` writes safetensors with a JSON config,
and :meth:`PixelEnsemble.load` never runs code from a file.

Prediction: majority vote of the members' argmaxes; per-pixel uncertainty = entropy of the mean
softmax minus the mean member entropy; per-image score = mean of its top-10% pixel uncertainties.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim import adam as torch_adam  # the public functional Adam (torch.optim.adam.adam)
from tqdm.auto import tqdm

from .features import FeatureMaps


@dataclass
class EnsembleConfig:
    num_classes: int
    num_members: int = 10
    hidden: tuple[int, int] | None = None   # None: (128, 32) if num_classes < 30 else (256, 128)
    lr: float = 1e-3                        # Adam, as in DDPM-Seg
    batch_size: int = 64
    max_epochs: int = 100
    min_epochs: int = 4                     # early stopping is checked from the 5th epoch on ("epoch > 3")
    patience: int = 50                      # stop once more than 50 batches in a row fail to beat the best loss
    init_std: float = 0.02
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    seed: int = 0                           # member e uses seed + e
    max_steps: int | None = None            # cap on batches in all (smoke tests, benchmarks); None = no cap
    ignore_index: int = 255

    def widths(self) -> tuple[int, int]:
        return tuple(self.hidden) if self.hidden else ((128, 32) if self.num_classes < 30 else (256, 128))


# device type -> whether torch.optim's fused Adam runs there; probed once per process (see _fused_adam_works)
_FUSED_ADAM: dict[str, bool] = {}
_GROUPS = ("weights", "biases", "bn_weight", "bn_bias", "running_mean", "running_var")
_FORMAT = "diffseg_utils.PixelEnsemble/1"
_SAMPLE_BYTES = 4 * 2**20  # float32 features interpolated per FeatureMaps.sample call while training (cache-sized)


def member_init(dim: int, cfg: EnsembleConfig, seed: int) -> list[torch.Tensor]:
    """One member's initial (W1, W2, W3) in (in, out) layout, drawn from its own seed (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    h1, h2 = cfg.widths()
    return [torch.randn(a, b, generator=g) * cfg.init_std for a, b in ((dim, h1), (h1, h2), (h2, cfg.num_classes))]


def member_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of n training pixels for one member and epoch (int64, CPU)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _fused_adam_works(device: torch.device) -> bool:
    """Whether ``torch.optim.adam.adam(..., fused=True)`` gives Adam's first step on ``device`` (probed once).

    The probe catches every way a torch release can lack or change the fused path (missing
    function, changed signature, no kernel for the device) and checks the value it computes, so
    training falls back to the plain update instead of failing or silently going wrong.
    """
    kind = torch.device(device).type
    if kind not in _FUSED_ADAM:
        try:
            p, g = torch.zeros(3, device=device), torch.ones(3, device=device)
            m, v, t = torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), device=device)
            torch_adam.adam([p], [g], [m], [v], [], [t], fused=True, amsgrad=False, beta1=0.9, beta2=0.999,
                                  lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False)
            ok = torch.allclose(p.cpu(), torch.full((3,), -1e-3), rtol=1e-4, atol=0.0) and float(t) == 1.0
        except (AttributeError, TypeError, RuntimeError, NotImplementedError, ValueError):
            ok = False
        _FUSED_ADAM[kind] = ok
    return _FUSED_ADAM[kind]


class _Adam:
    """``torch.optim.Adam`` (no weight decay, no amsgrad) over tensors that all share one step count.

    fused=True: torch.optim's public functional Adam with its fused kernel (one pass over each
    tensor; the step counters live on the device, so nothing crosses to the host). fused=False:
    the same arithmetic as torch's single-tensor Adam; the bias corrections are Python floats
    from a host-side step count, so this path does not synchronise either.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, fused: bool, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.fused, (self.b1, self.b2), self.eps = lr, fused, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0
        self.steps = [torch.zeros((), device=p.device) for p in params] if fused else []

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.t += 1
        if self.fused:
            torch_adam.adam(params, grads, self.m, self.v, [], self.steps, fused=True, amsgrad=False,
                                  beta1=self.b1, beta2=self.b2, lr=self.lr, weight_decay=0.0, eps=self.eps,
                                  maximize=False)
            return
        bc1, bc2_sqrt = 1 - self.b1 ** self.t, math.sqrt(1 - self.b2 ** self.t)
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(self.eps), value=-self.lr / bc1)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these members (rows of dim 0) in the moment estimates."""
        self.m = [m.index_select(0, rows) for m in self.m]
        self.v = [v.index_select(0, rows) for v in self.v]


def _train_step(P: list[torch.Tensor], R: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: EnsembleConfig,
                active: torch.Tensor | None = None, gw_out: list[torch.Tensor] | None = None):
    """Training-mode forward + hand-written backward of stacked members (see PixelEnsemble.train_step).

    P: the parameters in :meth:`PixelEnsemble.params` order; R: running (mean1, mean2, var1,
    var2), updated in place. x: (E, b, d) float32, y: (E, b) int64. ``gw_out``: buffers shaped
    like W1..3 to write the weight gradients into. Reusing them matters on the CPU: a fresh
    W1-sized tensor every step (43 MB at 8448 dims) is a fresh mmap, and its page faults cost
    more than the matmul that fills it (measured 52 ms vs 15 ms per step).
    """
    tn = lambda a, g, i: torch.bmm(a.transpose(1, 2), g, out=None if gw_out is None else gw_out[i])
    b = x.shape[1]
    W, bias, gamma, beta = P[0:3], P[3:6], P[6:8], P[8:10]
    mom = cfg.bn_momentum if active is None else cfg.bn_momentum * active.view(-1, 1, 1).to(x.dtype)
    h, saved = x, []
    for i in range(2):
        a = torch.baddbmm(bias[i], h, W[i]).relu_()                    # (E, b, h_i)
        mean = a.mean(1, keepdim=True)
        d = a - mean
        var = (d * d).mean(1, keepdim=True)   # biased, as BatchNorm normalises with (var_mean: 20x slower here)
        rstd = torch.rsqrt(var + cfg.bn_eps)
        xh = d.mul_(rstd)
        R[i].lerp_(mean, mom)
        R[2 + i].lerp_(var * (b / max(b - 1, 1)), mom)   # the running variance is the unbiased one
        saved.append((h, a, xh, rstd))
        h = torch.addcmul(beta[i], xh, gamma[i])
    # log-softmax over the class axis, computed with classes on dim 1: for K ~ 10 classes as the last,
    # contiguous dim the CPU kernel is ~9x slower (measured); same values, logp is a transposed view
    logp = torch.log_softmax(torch.baddbmm(bias[2], h, W[2]).transpose(1, 2), 1).transpose(1, 2)   # (E, b, K)
    loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
    dz = logp.exp_()
    dz.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(dz[..., :1], -1.0)).div_(b)
    gW, gb, gg, gB = [None] * 3, [None] * 3, [None] * 2, [None] * 2
    gW[2], gb[2] = tn(h, dz, 2), dz.sum(1, keepdim=True)
    for i in (1, 0):
        dn = torch.bmm(dz, W[i + 1].transpose(1, 2))   # d loss / d BN output
        h_in, a, xh, rstd = saved[i]
        gg[i], gB[i] = (dn * xh).sum(1, keepdim=True), dn.sum(1, keepdim=True)
        # BatchNorm backward, rstd*gamma*(dn - mean(dn) - xh*mean(dn*xh)), as k1*dn + k2*xh + k3 with
        # per-feature (E, 1, h) factors: two passes over the batch instead of eight
        k1 = rstd * gamma[i]
        da = torch.addcmul(k1 * gB[i] * (-1.0 / b), dn, k1).addcmul_(xh, k1 * gg[i] * (-1.0 / b))
        dz = da.mul_(torch.sign(a))   # through the ReLU: a >= 0, so sign(a) is its derivative (where(): 15x slower)
        gW[i], gb[i] = tn(h_in, dz, i), dz.sum(1, keepdim=True)
    return loss, gW + gb + gg + gB


def _label_tensor(labels, features: FeatureMaps, cfg: EnsembleConfig) -> torch.Tensor:
    """Validated int64 labels (N, H, W): integer class ids in [0, num_classes) or ignore_index."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
    else:
        try:
            arr = np.asarray(labels)
        except ValueError as err:  # numpy refuses ragged nesting
            raise ValueError("labels must be one (N, H, W) array of class ids; got a ragged sequence (label maps "
                             "of different sizes?). Resize every map to the features' image_size "
                             f"{features.image_size} with nearest-neighbour sampling first") from err
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"labels must be numbers (integer class ids); got dtype {arr.dtype}")
        t = torch.as_tensor(arr)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"labels must be integer class ids; got dtype {t.dtype}. For a binary mask pass "
                        "mask.long() (classes 0 and 1)")
    if t.is_floating_point():
        frac = ~torch.isfinite(t) | (t != t.round())
        if bool(frac.any()):
            raise ValueError(f"labels must be integer class ids; got {t.dtype} values that are not whole numbers, "
                             f"e.g. {t[frac].flatten()[:3].tolist()}. Pass the class-id map itself (resized with "
                             "nearest-neighbour sampling, never bilinear), as an integer array or tensor")
    expect = (features.num_images, *features.image_size)
    if t.ndim != 3 or tuple(t.shape) != expect:
        raise ValueError(f"labels must be (N, H, W) = {expect} to match the features (one label map per feature "
                         f"image, at the features' image_size); got {tuple(t.shape)}")
    t = t.long()
    valid = t != cfg.ignore_index
    bad = valid & ((t < 0) | (t >= cfg.num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels {torch.unique(t[bad]).tolist()[:5]} are outside 0..{cfg.num_classes - 1}; "
                         f"set num_classes or map them to ignore_index={cfg.ignore_index}")
    return t


class PixelEnsemble:
    """An ensemble of DDPM-Seg pixel MLPs (see module doc). ``fit`` then ``predict``.

    device: where the members live. ``None`` (default) follows the features: ``fit`` and
    ``predict`` move the ensemble to ``features.device``. A device given here pins it there
    (features sampled elsewhere are copied over).
    dtype: the members' parameters and arithmetic are float32 whatever the features' storage
    dtype (fp16 / bf16 maps are interpolated and upcast to float32 by ``FeatureMaps.sample``):
    Adam and BatchNorm statistics in half precision would change what is learned.
    """

    def __init__(self, config: EnsembleConfig, dim: int, device: torch.device | str | None = None):
        self.cfg, self.dim = config, dim
        self._pinned = device is not None
        self.device = torch.device(device if device is not None else "cpu")
        E, (h1, h2), K = config.num_members, config.widths(), config.num_classes
        inits = [member_init(dim, config, config.seed + e) for e in range(E)]
        self.weights = [torch.stack([m[i] for m in inits]).to(self.device) for i in range(3)]  # (E, in, out)
        self.biases = [torch.zeros(E, 1, w, device=self.device) for w in (h1, h2, K)]
        self.bn_weight = [torch.ones(E, 1, w, device=self.device) for w in (h1, h2)]
        self.bn_bias = [torch.zeros(E, 1, w, device=self.device) for w in (h1, h2)]
        self.running_mean = [torch.zeros(E, 1, w, device=self.device) for w in (h1, h2)]
        self.running_var = [torch.ones(E, 1, w, device=self.device) for w in (h1, h2)]
        self.history: list[dict] = []

    # ------------------------------------------------------------------ model
    def params(self) -> list[torch.Tensor]:
        """The trained tensors: W1..3 (E, in, out), b1..3 (E, 1, out), BN weights (E, 1, h), BN biases (E, 1, h)."""
        return self.weights + self.biases + self.bn_weight + self.bn_bias

    def to(self, device: torch.device | str) -> "PixelEnsemble":
        """Move every tensor to ``device`` (and keep it there: later fits and predictions do not move it)."""
        self.device, self._pinned = torch.device(device), True
        for k in _GROUPS:
            setattr(self, k, [t.to(self.device) for t in getattr(self, k)])
        return self

    def _follow(self, features: FeatureMaps) -> None:
        if not self._pinned and features.device != self.device:
            self.to(features.device)
            self._pinned = False

    def _bn(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """BatchNorm with the running statistics (evaluation mode)."""
        return (h - self.running_mean[i]) * torch.rsqrt(self.running_var[i] + self.cfg.bn_eps) * self.bn_weight[i] \
            + self.bn_bias[i]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation-mode logits, float32. x: (E, B, d) per-member batches, or (B, d) shared by all members
        (any float dtype, computed in float32) -> (E, B, K)."""
        x = x.to(self.weights[0].dtype)
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(self.cfg.num_members, -1, -1)
        h = x
        for i in range(2):
            h = self._bn(torch.relu(torch.baddbmm(self.biases[i], h, self.weights[i])), i)
        return torch.baddbmm(self.biases[2], h, self.weights[2])

    def train_step(self, x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None = None):
        """One training-mode forward + backward of every member, written out by hand.

        x: (E, b, d) float32 per-member batches, y: (E, b) int64 labels. Returns the per-member
        mean cross-entropy (E,) and the gradients in :meth:`params` order. Updates the running
        BatchNorm statistics as ``nn.BatchNorm1d.train()`` would — of the members where the
        optional (E,) bool ``active`` is true. Equal to autograd through the same network
        (tested); written out because autograd's per-op overhead, not arithmetic, dominates
        members this small on a CPU.
        """
        return _train_step(self.params(), self.running_mean + self.running_var, x, y, self.cfg, active)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def fit(self, features: FeatureMaps, labels, progress: bool = True, max_pixels: int | None = None,
            cache_bytes: int = 2**30) -> "PixelEnsemble":
        """Train every member on the labelled pixels of ``labels`` ``(N, H, W)`` (ignore_index skipped).

        labels: integer class ids in [0, num_classes) or ``ignore_index`` (numpy array or tensor,
        any integer dtype; floats only when every value is a whole number), one map per feature
        image at ``features.image_size``. DDPM-Seg uses all pixels (the default); ``max_pixels``
        trains on a fixed random subset of that many (seeded) for quick runs. ``cache_bytes``: when the
        training pixels' float32 features fit in this many bytes they are interpolated once and
        batches are gathered from that table (DDPM-Seg's dense matrix, restricted to the labelled
        pixels); otherwise each batch is interpolated from the maps as it is drawn. Same numbers
        either way (interpolation is per pixel); the table is far faster for small feature
        stores, where interpolating every batch would cost more than the MLPs.

        Each member follows DDPM-Seg's loop as if trained alone: Adam on batches of its own
        shuffled order, and from epoch ``min_epochs`` on it stops once more than ``patience``
        batches in a row fail to beat its best batch loss. A stopped member leaves the batched
        computation. No per-step host synchronisation: the loop reads the members' strike counts
        back only when one of them could have reached ``patience`` (a member with s strikes
        cannot stop within the next ``patience - s`` steps), so stops land exactly where the
        sequential loop puts them.
        """
        cfg = self.cfg
        if features.channels != self.dim:
            raise ValueError(f"the ensemble was built for {self.dim}-dim features, these have {features.channels}")
        labels = _label_tensor(labels, features, cfg)
        self._follow(features)
        dev = self.device
        flat = torch.nonzero(labels.reshape(-1) != cfg.ignore_index).squeeze(1).cpu()
        if max_pixels is not None and flat.numel() > max_pixels:
            keep = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(cfg.seed))[:max_pixels]
            flat = flat[keep.sort().values]
        if flat.numel() < cfg.batch_size:
            raise ValueError(f"only {flat.numel()} labelled pixels; need at least one batch ({cfg.batch_size})")
        n, B = flat.numel(), cfg.batch_size
        y_all = labels.reshape(-1)[flat.to(labels.device)].to(dev)
        flat = flat.to(dev)
        steps_per_epoch = math.ceil(n / B)
        table = self._pixel_table(features, flat) if n * self.dim * 4 <= cache_bytes else None

        live = list(range(cfg.num_members))                        # members still training (host list)
        P = [t.clone() for t in self.params()]                     # working copies: rows = live members
        R = [t.clone() for t in self.running_mean + self.running_var]
        opt = _Adam(P, cfg.lr, _fused_adam_works(dev))
        gw = [torch.empty_like(w) for w in P[:3]]                  # weight-gradient buffers, reused every step
        best = torch.full((len(live),), math.inf, device=dev)
        strikes = torch.zeros(len(live), dtype=torch.long, device=dev)
        strikes_seen = [0] * len(live)                             # strikes as last read back
        final_best = [math.inf] * cfg.num_members
        self.member_steps = [0] * cfg.num_members                  # batches each member trained
        bar = tqdm(total=cfg.max_epochs * steps_per_epoch, desc="ensemble", disable=not progress, leave=False)
        done = 0  # batches so far (a disabled tqdm does not count, so never read bar.n)
        capped = lambda: cfg.max_steps is not None and done >= cfg.max_steps
        for epoch in range(cfg.max_epochs):
            checking = epoch >= cfg.min_epochs  # DDPM-Seg: "if epoch > 3" with 0-based epochs
            orders = torch.stack([member_order(n, cfg.seed + e, epoch) for e in live]).to(dev)
            s = 0
            while s < steps_per_epoch and live and not capped():
                run = steps_per_epoch - s
                if checking:  # no member can reach patience + 1 strikes before the end of this run
                    run = min(run, cfg.patience + 1 - max(strikes_seen))
                if cfg.max_steps is not None:
                    run = min(run, cfg.max_steps - done)
                if gw[0].shape != P[0].shape:  # members left: the buffers follow
                    gw = [torch.empty_like(w) for w in P[:3]]
                for x, y in self._batches(features, table, flat, y_all, orders, s, s + run):
                    loss, grads = _train_step(P, R, x, y, cfg, gw_out=gw)
                    opt.step(P, grads)
                    if checking:
                        better = loss < best
                        best = torch.where(better, loss, best)
                        strikes.add_(1).masked_fill_(better, 0)
                s, done = s + run, done + run
                bar.update(run)
                if checking:
                    strikes_seen = strikes.tolist()  # the one read-back per run
                    stopped = [j for j, k in enumerate(strikes_seen) if k > cfg.patience]
                    if stopped:
                        for j in stopped:
                            self.member_steps[live[j]] = done
                        P, R, live, best, strikes, orders, strikes_seen = self._retire(
                            stopped, P, R, opt, live, best, strikes, orders, strikes_seen, final_best)
            for e, v in zip(live, best.tolist()):
                final_best[e] = v
            self.history.append({"epoch": epoch, "active": len(live), "best_loss": list(final_best)})
            if not live or capped():
                break
        for j, e in enumerate(live):
            self._store(e, P, R, j)
            self.member_steps[e] = done
        bar.close()
        self.epochs_trained, self.steps_trained = len(self.history), done  # done: batched steps run
        return self

    def _store(self, e: int, P, R, j: int) -> None:
        """Copy row j of the working tensors into member e of the ensemble."""
        for full, work in zip(self.params() + self.running_mean + self.running_var, P + R):
            full[e].copy_(work[j])

    def _retire(self, stopped, P, R, opt, live, best, strikes, orders, strikes_seen, final_best):
        """Store the stopped members and drop their rows from every per-member working tensor."""
        best_seen = best.tolist()
        for j in stopped:
            self._store(live[j], P, R, j)
            final_best[live[j]] = best_seen[j]
        keep = [j for j in range(len(live)) if j not in stopped]
        rows = torch.tensor(keep, dtype=torch.long, device=best.device)
        opt.keep(rows)
        pick = lambda ts: [t.index_select(0, rows) for t in ts]
        return (pick(P), pick(R), [live[j] for j in keep], best[rows], strikes[rows], orders[rows],
                [strikes_seen[j] for j in keep])

    def _pixel_table(self, features: FeatureMaps, flat: torch.Tensor, block: int = 16384) -> torch.Tensor:
        """Float32 features (n, d) of the training pixels ``flat``, on the ensemble's device."""
        H, W = features.image_size
        out = torch.empty(flat.numel(), self.dim, device=self.device)
        for s in range(0, flat.numel(), block):
            pix = flat[s:s + block]
            out[s:s + block] = features.sample(pix // (H * W), (pix // W) % H, pix % W, dtype=torch.float32).to(self.device)
        return out

    def _batches(self, features: FeatureMaps, table: torch.Tensor | None, flat: torch.Tensor, y_all: torch.Tensor,
                 orders: torch.Tensor, s0: int, s1: int):
        """(x (E, b, d) float32, y (E, b)) for steps s0..s1-1 of an epoch: gathered from ``table`` when
        there is one, else interpolated from the maps a few steps at a time (at most ``_SAMPLE_BYTES``,
        small enough to stay in cache)."""
        n, B = orders.shape[1], self.cfg.batch_size
        E, (H, W) = orders.shape[0], features.image_size
        if table is not None:
            buf = table.new_empty(E * B, table.shape[1])  # reused: no fresh allocation per step
            for j in range(s0, s1):
                pos = orders[:, j * B:(j + 1) * B]
                x = torch.index_select(table, 0, pos.reshape(-1), out=buf[:pos.numel()])
                yield x.view(E, pos.shape[1], -1), y_all[pos]
            return
        full = n // B                                   # steps with a whole batch; step `full` is the remainder
        cap = max(1, _SAMPLE_BYTES // (E * B * self.dim * 4))
        j = s0
        while j < s1:
            k, b = (1, n - j * B) if j >= full else (min(s1, full, j + cap) - j, B)
            pos = orders[:, j * B:j * B + k * b].reshape(E, k, b).transpose(0, 1)   # (k, E, b) positions in flat
            pix = flat[pos.reshape(-1)]
            x = features.sample(pix // (H * W), (pix // W) % H, pix % W, dtype=torch.float32)
            x = x.to(self.device).view(k, E, b, -1)
            y = y_all[pos]
            for t in range(k):
                yield x[t], y[t]
            j += k

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, features: FeatureMaps, chunk: int = 16384, progress: bool = False):
        """Majority-vote labels ``(N, H, W)`` int64, per-pixel uncertainty ``(N, H, W)`` float32 and per-image
        score ``(N,)`` float32, on the ensemble's device (the features' device unless pinned)."""
        if features.channels != self.dim:
            raise ValueError(f"the ensemble was built for {self.dim}-dim features, these have {features.channels}")
        self._follow(features)
        n, (H, W) = features.num_images, features.image_size
        total = n * H * W
        labels = torch.empty(total, dtype=torch.long, device=self.device)
        unc = torch.empty(total, device=self.device)
        for s in tqdm(range(0, total, chunk), desc="predict", disable=not progress, leave=False):
            idx = torch.arange(s, min(s + chunk, total), device=features.device)
            out = self.logits(features.sample(idx // (H * W), (idx // W) % H, idx % W).to(self.device))
            labels[s:s + chunk], unc[s:s + chunk] = vote_and_uncertainty(out)
        labels, unc = labels.reshape(n, H, W), unc.reshape(n, H, W)
        return labels, unc, image_uncertainty(unc)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """{"config": dict, "dim": int, "<group>": [CPU tensors]} for the groups weights, biases, bn_weight,
        bn_bias, running_mean, running_var."""
        return {"config": asdict(self.cfg), "dim": self.dim, **{k: [t.cpu() for t in getattr(self, k)] for k in _GROUPS}}

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors ``"<group>.<i>"``; the config as JSON in its header).

        Loading it runs no code, so an ensemble file can be shared safely (suffix: ``.safetensors``)."""
        from safetensors.torch import save_file

        tensors = {f"{k}.{i}": t.detach().cpu().contiguous() for k in _GROUPS for i, t in enumerate(getattr(self, k))}
        save_file(tensors, str(path), metadata={"format": _FORMAT, "config": json.dumps(asdict(self.cfg)),
                                                "dim": str(self.dim)})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "PixelEnsemble":
        """An ensemble written by :meth:`save` (device: as in the constructor; None follows the features).

        Never runs code from the file: a safetensors file is read as tensors plus a JSON header.
        A file from before safetensors (``torch.save`` of the state dict) is read with
        ``torch.load(weights_only=True)``, which accepts tensors and plain containers only;
        anything else (a pickle that would import or call something) raises ``ValueError``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ensemble file at {path}")
        cfg, dim, groups = _read_ensemble_file(path)
        known = {f.name for f in fields(EnsembleConfig)}
        if not isinstance(cfg, dict) or set(cfg) - known or "num_classes" not in cfg:
            raise ValueError(f"{path}: the ensemble config has unexpected keys "
                             f"{sorted(set(cfg) - known) if isinstance(cfg, dict) else type(cfg).__name__}")
        if cfg.get("hidden") is not None:
            cfg["hidden"] = tuple(cfg["hidden"])
        ens = cls(EnsembleConfig(**cfg), int(dim), device)
        for k in _GROUPS:
            want, got = getattr(ens, k), groups.get(k)
            if (not isinstance(got, (list, tuple)) or len(got) != len(want)
                    or any(not isinstance(g, torch.Tensor) or g.shape != w.shape for g, w in zip(got, want))):
                raise ValueError(f"{path}: {k!r} does not match the config's shapes "
                                 f"{[tuple(w.shape) for w in want]}; the file is damaged or not from PixelEnsemble.save")
            setattr(ens, k, [g.to(ens.device, torch.float32) for g in got])
        return ens


def _read_ensemble_file(path: Path) -> tuple[dict, int, dict[str, list[torch.Tensor]]]:
    """(config dict, dim, {group: [tensors]}) from a safetensors ensemble or a weights-only torch.save one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # not a safetensors file: try the restricted (weights-only) unpickler below
        meta = None
    if meta is not None:
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is a safetensors file but not a PixelEnsemble (format {meta.get('format')!r})")
        try:
            cfg, dim = json.loads(meta["config"]), int(meta["dim"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: unreadable ensemble header ({err})") from None
        groups = {k: [tensors[f"{k}.{i}"] for i in range(len(tensors)) if f"{k}.{i}" in tensors] for k in _GROUPS}
        return cfg, dim, groups
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler refuses any global it does not know
        raise ValueError(
            f"refusing to load {path}: it is neither a safetensors file written by PixelEnsemble.save nor a "
            f"torch.save of plain tensors ({type(err).__name__}: {str(err).splitlines()[0][:160]}). Loading never "
            "runs code from a file; ask for the ensemble re-saved with PixelEnsemble.save (safetensors)") from None
    if not isinstance(st, dict) or "config" not in st or "dim" not in st:
        raise ValueError(f"{path} holds no PixelEnsemble state (expected keys 'config', 'dim', {', '.join(_GROUPS)})")
    return st["config"], st["dim"], {k: st.get(k) for k in _GROUPS}


def vote_and_uncertainty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, P, K) member logits -> majority-vote label (P,) and uncertainty (P,).

    Ties go to the smallest label. Uncertainty = H(mean p) - mean H(p) (the ensemble's
    disagreement; 0 when all members give the same distribution).
    """
    votes = logits.argmax(-1)                                   # (E, P)
    k = logits.shape[-1]
    counts = F.one_hot(votes, k).sum(0)                         # (P, K)
    label = counts.argmax(-1)
    p = logits.float().softmax(-1)
    ent = lambda q: -(q * q.clamp_min(1e-12).log()).sum(-1)
    return label, ent(p.mean(0)) - ent(p).mean(0)


def image_uncertainty(unc: torch.Tensor, top: float = 0.1) -> torch.Tensor:
    """Per-image score: the mean of each image's top-``top`` fraction of pixel uncertainties."""
    flat = unc.reshape(unc.shape[0], -1)
    k = max(1, int(round(top * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)
