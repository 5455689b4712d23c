"""DDPM-Seg's pixel classifier: an ensemble of small MLPs trained *together* as one batched model.

Member (from DatasetGAN, as DDPM-Seg uses it)::

    Linear(d, h1) - ReLU - BatchNorm(h1) - Linear(h1, h2) - ReLU - BatchNorm(h2) - Linear(h2, K)
    (h1, h2) = (128, 32) if K < 30 else (256, 128); weights ~ N(0, 0.02), biases 0

Each member has its own seed (initialisation and data order), its own BatchNorm statistics and
its own early stop, exactly as if trained alone with Adam — but all members share one matmul
per layer (``torch.baddbmm`` over a stacked weight), so 10 members cost little more than one.
Training pixels are drawn through :meth:`FeatureMaps.sample` batch by batch: the (pixels x
features) matrix is never built.

Prediction: majority vote of the members' argmaxes; per-pixel uncertainty = entropy of the mean
softmax minus the mean member entropy; per-image score = mean of its top-10% pixel uncertainties.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


_FUSED_ADAM: dict[str, bool] = {}  # device type -> whether torch's fused Adam kernel is usable there


def member_init(dim: int, cfg: EnsembleConfig, seed: int) -> list[torch.Tensor]:
    """One member's initial (W1, W2, W3) in (in, out) layout, drawn from its own seed."""
    g = torch.Generator().manual_seed(seed)
    h1, h2 = cfg.widths()
    return [torch.randn(a, b, generator=g) * cfg.init_std for a, b in ((dim, h1), (h1, h2), (h2, cfg.num_classes))]


def member_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of n training pixels for one member and epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class PixelEnsemble:
    """An ensemble of DDPM-Seg pixel MLPs (see module doc). ``fit`` then ``predict``."""

    def __init__(self, config: EnsembleConfig, dim: int, device: torch.device | str = "cpu"):
        self.cfg, self.dim, self.device = config, dim, torch.device(device)
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
        return self.weights + self.biases + self.bn_weight + self.bn_bias

    def _bn(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """BatchNorm with the running statistics (evaluation mode)."""
        return (h - self.running_mean[i]) * torch.rsqrt(self.running_var[i] + self.cfg.bn_eps) * self.bn_weight[i] \
            + self.bn_bias[i]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation-mode logits. x: (E, B, d) per-member batches, or (B, d) shared by all members -> (E, B, K)."""
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(self.cfg.num_members, -1, -1)
        h = x
        for i in range(2):
            h = self._bn(torch.relu(torch.baddbmm(self.biases[i], h, self.weights[i])), i)
        return torch.baddbmm(self.biases[2], h, self.weights[2])

    def train_step(self, x: torch.Tensor, y: torch.Tensor, active: torch.Tensor):
        """One training-mode forward + backward of every member, written out by hand.

        x: (E, b, d) per-member batches, y: (E, b) labels. Returns the per-member mean
        cross-entropy (E,) and the gradients in :meth:`params` order. Updates the running
        BatchNorm statistics of the ``active`` members, as ``nn.BatchNorm1d.train()`` would.
        Equal to autograd through the same network (tested); written out because autograd's
        per-op overhead, not arithmetic, dominates members this small on a CPU.
        """
        cfg, b = self.cfg, x.shape[1]
        W, bias, gamma, beta = self.weights, self.biases, self.bn_weight, self.bn_bias
        m = cfg.bn_momentum * active.view(-1, 1, 1).to(x.dtype)
        h, saved = x, []
        for i in range(2):
            z = torch.baddbmm(bias[i], h, W[i])
            a = torch.relu(z)
            mean = a.mean(1, keepdim=True)
            d = a - mean
            var = (d * d).mean(1, keepdim=True)   # biased, as BatchNorm normalises with
            rstd = torch.rsqrt(var + cfg.bn_eps)
            xh = d * rstd
            self.running_mean[i].lerp_(mean, m)
            self.running_var[i].lerp_(var * (b / max(b - 1, 1)), m)
            saved.append((h, z, xh, rstd))
            h = torch.addcmul(beta[i], xh, gamma[i])
        logp = torch.log_softmax(torch.baddbmm(bias[2], h, W[2]), -1)
        loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
        dz = logp.exp_()
        dz.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(dz[..., :1], -1.0)).div_(b)
        gW, gb, gg, gB = [None] * 3, [None] * 3, [None] * 2, [None] * 2
        gW[2], gb[2] = torch.bmm(h.transpose(1, 2), dz), dz.sum(1, keepdim=True)
        for i in (1, 0):
            dn = torch.bmm(dz, W[i + 1].transpose(1, 2))   # d loss / d BN output
            h_in, z, xh, rstd = saved[i]
            gg[i], gB[i] = (dn * xh).sum(1, keepdim=True), dn.sum(1, keepdim=True)
            dxh = dn * gamma[i]
            da = rstd * (dxh - dxh.mean(1, keepdim=True) - xh * (dxh * xh).mean(1, keepdim=True))
            dz = da * (z > 0)
            gW[i], gb[i] = torch.bmm(h_in.transpose(1, 2), dz), dz.sum(1, keepdim=True)
        return loss, gW + gb + gg + gB

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def fit(self, features: FeatureMaps, labels, progress: bool = True, max_pixels: int | None = None) -> "PixelEnsemble":
        """Train every member on the labelled pixels of ``labels`` ``(N, H, W)`` (ignore_index skipped).

        DDPM-Seg uses all pixels (the default); ``max_pixels`` trains on a fixed random subset of
        that many (seeded) for quick runs.
        """
        cfg = self.cfg
        labels = torch.as_tensor(np.asarray(labels)).long()
        if labels.ndim != 3 or labels.shape[0] != features.num_images or tuple(labels.shape[1:]) != features.image_size:
            raise ValueError(f"labels must be (N, H, W) = ({features.num_images}, {features.image_size[0]}, "
                             f"{features.image_size[1]}) to match the features; got {tuple(labels.shape)}")
        if features.channels != self.dim:
            raise ValueError(f"the ensemble was built for {self.dim}-dim features, these have {features.channels}")
        valid = labels != cfg.ignore_index
        bad = valid & ((labels < 0) | (labels >= cfg.num_classes))
        if bad.any():
            raise ValueError(f"labels {torch.unique(labels[bad]).tolist()[:5]} are outside 0..{cfg.num_classes - 1}; "
                             f"set num_classes or map them to ignore_index={cfg.ignore_index}")
        flat = torch.nonzero(valid.reshape(-1)).squeeze(1)
        if max_pixels is not None and flat.numel() > max_pixels:
            keep = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(cfg.seed))[:max_pixels]
            flat = flat[keep.sort().values]
        if flat.numel() < cfg.batch_size:
            raise ValueError(f"only {flat.numel()} labelled pixels; need at least one batch ({cfg.batch_size})")
        n, (H, W) = flat.numel(), features.image_size
        y_all = labels.reshape(-1)[flat].to(self.device)
        E, B = cfg.num_members, cfg.batch_size
        steps_per_epoch = math.ceil(n / B)
        params = self.params()
        adam_m = [torch.zeros_like(p) for p in params]
        adam_v = [torch.zeros_like(p) for p in params]
        step_count = torch.zeros(E, device=self.device)
        active = torch.ones(E, dtype=torch.bool, device=self.device)
        best = torch.full((E,), float("inf"), device=self.device)
        strikes = torch.zeros(E, dtype=torch.long, device=self.device)
        bar = tqdm(total=cfg.max_epochs * steps_per_epoch, desc="ensemble", disable=not progress, leave=False)
        done = 0  # batches so far (a disabled tqdm does not count, so never read bar.n)
        flat_dev = flat.to(self.device)
        for epoch in range(cfg.max_epochs):
            orders = torch.stack([member_order(n, cfg.seed + e, epoch) for e in range(E)]).to(self.device)
            for s in range(steps_per_epoch):
                if not active.any() or (cfg.max_steps is not None and done >= cfg.max_steps):
                    break
                idx = orders[:, s * B:(s + 1) * B]                      # (E, b) positions in flat
                pix = flat_dev[idx.reshape(-1)]
                x = features.sample(pix // (H * W), (pix // W) % H, pix % W).reshape(E, idx.shape[1], -1)
                y = y_all[idx]
                loss_e, grads = self.train_step(x, y, active)
                step_count += active.float()
                self._adam(params, grads, adam_m, adam_v, step_count, active)
                if epoch >= cfg.min_epochs:  # DDPM-Seg: "if epoch > 3" with 0-based epochs
                    better = loss_e < best
                    best = torch.where(active & better, loss_e, best)
                    strikes = torch.where(active & better, torch.zeros_like(strikes), strikes + active.long())
                    active = active & (strikes <= cfg.patience)
                bar.update(1)
                done += 1
            self.history.append({"epoch": epoch, "active": int(active.sum()), "best_loss": best.tolist()})
            if not active.any() or (cfg.max_steps is not None and done >= cfg.max_steps):
                break
        bar.close()
        self.epochs_trained = len(self.history)
        return self

    def _adam(self, params, grads, ms, vs, step, active, b1=0.9, b2=0.999, eps=1e-8):
        """torch.optim.Adam's update, per member; members that stopped are left untouched."""
        lr = self.cfg.lr
        if bool(active.all()) and bool((step == step[0]).all()):
            # common case: every member trains, same step count -> torch's fused Adam kernel (one pass)
            t = float(step[0])
            if _FUSED_ADAM.get(params[0].device.type, hasattr(torch, "_fused_adam_")):
                steps = [torch.tensor(t, device=params[0].device) for _ in params]
                try:
                    torch._fused_adam_(params, grads, ms, vs, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=0.0,
                                       eps=eps, amsgrad=False, maximize=False)
                    return
                except (NotImplementedError, RuntimeError):  # no fused kernel for this device in this torch
                    _FUSED_ADAM[params[0].device.type] = False
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, bc2 ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, ms, denom, -lr / bc1)
            return
        a = active.view(-1, 1, 1)
        bc1 = (1 - b1 ** step).view(-1, 1, 1).clamp_min(1e-12)
        bc2 = (1 - b2 ** step).view(-1, 1, 1).clamp_min(1e-12)
        for p, g, m, v in zip(params, grads, ms, vs):
            m.copy_(torch.where(a, m * b1 + (1 - b1) * g, m))
            v.copy_(torch.where(a, v * b2 + (1 - b2) * g * g, v))
            upd = (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps)
            p.sub_(torch.where(a, upd, torch.zeros_like(upd)))

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, features: FeatureMaps, chunk: int = 16384, progress: bool = False):
        """Majority-vote labels ``(N, H, W)``, per-pixel uncertainty ``(N, H, W)`` and per-image score ``(N,)``."""
        if features.channels != self.dim:
            raise ValueError(f"the ensemble was built for {self.dim}-dim features, these have {features.channels}")
        n, (H, W) = features.num_images, features.image_size
        total = n * H * W
        labels = torch.empty(total, dtype=torch.long, device=self.device)
        unc = torch.empty(total, device=self.device)
        for s in tqdm(range(0, total, chunk), desc="predict", disable=not progress, leave=False):
            idx = torch.arange(s, min(s + chunk, total), device=self.device)
            out = self.logits(features.sample(idx // (H * W), (idx // W) % H, idx % W))
            labels[idx], unc[idx] = vote_and_uncertainty(out)
        labels, unc = labels.reshape(n, H, W), unc.reshape(n, H, W)
        return labels, unc, image_uncertainty(unc)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "dim": self.dim,
                **{k: [t.cpu() for t in getattr(self, k)] for k in
                   ("weights", "biases", "bn_weight", "bn_bias", "running_mean", "running_var")}}

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "PixelEnsemble":
        st = torch.load(path, map_location="cpu", weights_only=False)
        cfg = st["config"]
        if cfg.get("hidden") is not None:
            cfg["hidden"] = tuple(cfg["hidden"])
        ens = cls(EnsembleConfig(**cfg), st["dim"], device)
        for k in ("weights", "biases", "bn_weight", "bn_bias", "running_mean", "running_var"):
            setattr(ens, k, [t.to(ens.device) for t in st[k]])
        return ens


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
