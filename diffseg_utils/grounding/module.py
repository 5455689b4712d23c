"""The Grounded Diffusion grounding module: UNet features + a class's text embedding -> a mask.

>>> bb = load_backbone("toy")
>>> gm = GroundingModule.for_backbone(bb)                     # channels from a dry run of bb's UNet
>>> batch = generate_with_features(bb, [prompt_template(bb).format("star")], num_steps=2)
>>> q = class_embeddings(bb, ["star", "ring"])                # (2, text_dim), in bb's prompt template
>>> logits = gm(batch.features, q[None])                      # (1, 2, 64, 64)
>>> loss = bce_loss(logits, target_masks, valid)              # classes the labeller missed: valid=False

Parts (Li et al., ICCV 2023; departures from the paper in docs/methods.md):

* visual encoder: per resolution group a 1x1 conv, then progressive fusion from the lowest
  resolution upward (upsample, concatenate, residual "mix" block) -> per-pixel embeddings of
  dim E = sum(proj_channels) at the highest feature resolution;
* fusion: text queries attend to patch tokens of that map in a pre-norm transformer decoder;
  an MLP turns each query into a mask embedding; mask logits are its dot product with every
  pixel embedding, upsampled bilinearly to the image size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, default_device
from ..text import token_span
from .features import feature_channels
from .prompts import check_template, prompt_template


@dataclass
class GroundingConfig:
    """Grounding-module hyperparameters; defaults are the paper's unless marked otherwise."""

    d_model: int = 512        # paper: transformer width (queries and image tokens projected to it)
    heads: int = 8            # paper: attention heads
    layers: int = 3           # paper: decoder layers
    ff: int = 2048            # paper: feed-forward width
    patch: int = 4            # paper: 4x4 patches of the pixel-embedding map become image tokens
    dropout: float = 0.0      # ours (the paper does not say)
    # per resolution group, lowest resolution first; None -> 16 * 2**i (paper: 16/32/64/128 for
    # SD's 8/16/32/64 groups, i.e. 240-d pixel embeddings)
    proj_channels: tuple[int, ...] | None = None
    # the prompt template of the class-name text queries; None = the backbone's
    # (prompt_template(backbone); the paper's "a photograph of a {}" for SD). for_backbone fills it in,
    # so a saved module records the template it was trained with.
    template: str | None = None
    threshold: float = 0.5    # paper: mask = sigmoid(logit) > 0.5
    lr: float = 1e-5          # paper: Adam learning rate (read by the training loop, not here)


def default_proj_channels(num_groups: int) -> tuple[int, ...]:
    """16 * 2**i for the i-th group counted from the lowest resolution (SD 1.5's 4 groups -> 16, 32, 64, 128)."""
    return tuple(16 * 2 ** i for i in range(num_groups))


class MixBlock(nn.Module):
    """Residual block: (non-affine BN -> ReLU -> 3x3 conv) twice, plus a skip (1x1 conv if channels differ)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin, affine=False), nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout, affine=False), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class VisualEncoder(nn.Module):
    """Per-group 1x1 projections fused from the lowest resolution upward -> (N, E, R, R) pixel embeddings."""

    def __init__(self, channels: dict[int, int], proj_channels: Sequence[int]):
        super().__init__()
        self.resolutions = sorted(channels)
        self.proj = nn.ModuleList(nn.Conv2d(channels[r], c, 1, bias=False)
                                  for r, c in zip(self.resolutions, proj_channels))
        # after concatenating group i the map has sum(proj_channels[:i + 1]) channels; the mix keeps them
        cum = [sum(proj_channels[:i + 1]) for i in range(len(proj_channels))]
        self.mix = nn.ModuleList(MixBlock(c, c) for c in cum[1:])

    def forward(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        x = self.proj[0](features[self.resolutions[0]])
        for r, proj, mix in zip(self.resolutions[1:], self.proj[1:], self.mix):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
            x = mix(torch.cat([x, proj(features[r])], dim=1))
        return x


class GroundingModule(nn.Module):
    """Mask logits for text queries from grouped UNet features (Grounded Diffusion's grounding module).

    channels:   input channels per feature resolution (``feature_channels(backbone)``).
    text_dim:   width of the text queries (the text encoder's hidden size; 768 for SD 1.x).
    image_size: default output side (the backbone's image size).

    Image tokens get a learned 2-D positional embedding (one vector per patch of the fixed token
    grid). The patch size must divide the highest feature resolution; otherwise construction
    fails, saying which patch sizes would work (we do not silently pick another).
    """

    def __init__(self, channels: dict[int, int], text_dim: int, image_size: int,
                 config: GroundingConfig | None = None):
        super().__init__()
        cfg = config or GroundingConfig()
        if not channels:
            raise ValueError("channels is empty: pass {resolution: in_channels}, e.g. feature_channels(backbone)")
        self.channels = {int(r): int(c) for r, c in sorted(channels.items())}
        self.resolutions = list(self.channels)
        proj = tuple(cfg.proj_channels) if cfg.proj_channels is not None else default_proj_channels(len(channels))
        if len(proj) != len(channels):
            raise ValueError(f"proj_channels has {len(proj)} entries but there are {len(channels)} resolution "
                             f"groups {self.resolutions}; give one per group, lowest resolution first")
        self.config = replace(cfg, proj_channels=proj)
        self.text_dim, self.image_size = int(text_dim), int(image_size)
        self.embed_dim = sum(proj)                                      # E
        side, p = self.resolutions[-1], cfg.patch
        if p < 1 or side % p:
            ok = [d for d in range(1, side + 1) if side % d == 0]
            raise ValueError(f"patch={p} does not tile the highest feature resolution {side}x{side}; "
                             f"use one of {ok} (GroundingConfig(patch=...))")
        self.grid = side // p                                           # tokens per side

        self.encoder = VisualEncoder(self.channels, proj)
        self.query_proj = nn.Linear(self.text_dim, cfg.d_model)
        self.token_proj = nn.Linear(self.embed_dim * p * p, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(self.grid * self.grid, cfg.d_model) * 0.02)
        # the decoder layers pre-normalise the queries only; normalise the image tokens once here
        self.token_norm = nn.LayerNorm(cfg.d_model)
        layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.heads, cfg.ff, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.layers, norm=nn.LayerNorm(cfg.d_model))
        self.mask_mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU(),
                                      nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU(),
                                      nn.Linear(cfg.d_model, self.embed_dim))

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg_batch: bool = True,
                     config: GroundingConfig | None = None) -> "GroundingModule":
        """A module sized for ``backbone`` (channels from a dry run, text width, image size), on its device, fp32.

        cfg_batch: True when features come from classifier-free-guided generation (``guidance_scale != 1``:
                   uncond + cond halves concatenated on channels).
        """
        if not backbone.is_conditional:
            raise ValueError(f"{backbone.name or 'this backbone'} has no text encoder; grounding needs text queries")
        text_dim = int(backbone.empty_prompt(1).embeds.shape[-1])  # the width of the tokens the denoiser reads
        cfg = config or GroundingConfig()
        if cfg.template is None:
            cfg = replace(cfg, template=prompt_template(backbone))
        return cls(feature_channels(backbone, cfg_batch), text_dim, backbone.resolution, cfg).to(backbone.device)

    # ------------------------------------------------------------------ forward
    def _check(self, features: dict[int, torch.Tensor], queries: torch.Tensor) -> int:
        got, want = set(features), set(self.resolutions)
        if got != want:
            raise ValueError(f"feature resolutions {sorted(got)} do not match the module's {sorted(want)} "
                             f"(missing {sorted(want - got)}, extra {sorted(got - want)}); pass the features "
                             "of the backbone the module was built for")
        ns = set()
        for r in self.resolutions:
            f = features[r]
            if f.ndim != 4 or f.shape[1] != self.channels[r] or tuple(f.shape[-2:]) != (r, r):
                raise ValueError(f"features[{r}] has shape {tuple(f.shape)}, expected (N, {self.channels[r]}, {r}, {r})"
                                 " -- channel counts differ with and without classifier-free guidance (uncond + cond are concatenated)")
            ns.add(f.shape[0])
        if len(ns) != 1:
            raise ValueError(f"feature batch sizes differ across resolutions: "
                             f"{ {r: features[r].shape[0] for r in self.resolutions} }")
        n = ns.pop()
        if queries.ndim != 3 or queries.shape[-1] != self.text_dim:
            raise ValueError(f"queries must be (N, Q, {self.text_dim}); got {tuple(queries.shape)}"
                             " (for class embeddings shared by the batch use q[None].expand(N, -1, -1))")
        if queries.shape[0] != n:
            raise ValueError(f"queries are for {queries.shape[0]} images but features for {n}")
        return n

    def pixel_embeddings(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-pixel embeddings ``(N, E, R, R)`` at the highest feature resolution."""
        p = next(self.parameters())
        return self.encoder({r: features[r].to(p.device, p.dtype) for r in self.resolutions})

    def forward(self, features: dict[int, torch.Tensor], queries: torch.Tensor,
                out_size: int | None = None) -> torch.Tensor:
        """Mask logits ``(N, Q, H, W)``, H = W = ``out_size`` (default: ``image_size``).

        features: resolution -> ``(N, C_r, r, r)`` (any float dtype/device; cast to the module's).
        queries:  ``(N, Q, text_dim)`` class text embeddings (:func:`class_embeddings`).
        """
        self._check(features, queries)
        pix = self.pixel_embeddings(features)                          # (N, E, R, R)
        n, e, side, _ = pix.shape
        p, g = self.config.patch, self.grid
        tokens = pix.reshape(n, e, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, e * p * p)
        tokens = self.token_norm(self.token_proj(tokens) + self.pos)   # (N, T, d)
        q = self.query_proj(queries.to(pix.device, pix.dtype))         # (N, Q, d)
        q = self.decoder(q, tokens)                                    # self-attn over queries, cross-attn to tokens
        m = self.mask_mlp(q)                                           # (N, Q, E)
        logits = torch.einsum("nqe,nehw->nqhw", m, pix)               # (N, Q, R, R)
        size = out_size or self.image_size
        if size != side:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict(self, features: dict[int, torch.Tensor], queries: torch.Tensor,
                out_size: int | None = None) -> torch.Tensor:
        """Boolean masks ``(N, Q, H, W)``: sigmoid(logits) > ``config.threshold`` (run in eval mode)."""
        was = self.training
        self.eval()
        try:
            return self(features, queries, out_size).sigmoid() > self.config.threshold
        finally:
            self.train(was)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Config, channels, text width, image size and weights in one file."""
        torch.save({"config": asdict(self.config), "channels": self.channels, "text_dim": self.text_dim,
                    "image_size": self.image_size,
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | Backbone | None = None, *,
             map_location: torch.device | str | None = None) -> "GroundingModule":
        """Rebuild a module written by :meth:`save` on ``device`` (a device, or a backbone: its device;
        default :func:`~diffseg_utils.backbones.default_device`). ``map_location`` is an alias of ``device``.

        The file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists
        and dicts only, so loading a file from someone else cannot run code.
        """
        if device is not None and map_location is not None:
            raise TypeError("pass device or map_location, not both")
        device = device if device is not None else map_location
        if isinstance(device, Backbone):
            device = device.device
        device = torch.device(device) if device is not None else default_device()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no grounding module at {path}; train one with "
                                    "`python -m diffseg_utils.grounding.train --shards DIR --out DIR`")
        st = torch.load(path, map_location=device, weights_only=True)
        cfg = dict(st["config"])
        cfg["proj_channels"] = tuple(cfg["proj_channels"])
        m = cls(st["channels"], st["text_dim"], st["image_size"], GroundingConfig(**cfg))
        m.load_state_dict(st["state_dict"])
        return m.to(device)


def query_template(backbone: Backbone, module: GroundingModule | None = None, template: str | None = None) -> str:
    """The template for text queries: ``template`` if given, else the backbone's prompt template.

    A module trained with another template (``module.config.template``) would get queries it has
    never seen, so that is a ValueError naming both and the fix (retrain, or pass ``template=``).
    """
    if template is not None:
        return check_template(template)
    ours = prompt_template(backbone)
    trained = module.config.template if module is not None else None
    if trained is not None and trained != ours:
        raise ValueError(f"the grounding module was trained with text queries from the template {trained!r}, but "
                         f"the backbone {backbone.name or ''!r} prompts with {ours!r}: retrain the module on data "
                         "synthesised with the backbone's template (`python -m diffseg_utils.grounding.synth ...` "
                         "then `python -m diffseg_utils.grounding.train ...`), or pass template= explicitly")
    return ours


# ---------------------------------------------------------------------------- text queries
@torch.no_grad()
def class_embeddings(backbone: Backbone, names: Sequence[str], template: str | None = None) -> torch.Tensor:
    """Text queries ``(len(names), text_dim)``, fp32 on the backbone's device (the paper's query).

    The frozen text encoder's last hidden states for ``template.format(name)`` (default template:
    the backbone's, :func:`~diffseg_utils.grounding.prompts.prompt_template`), averaged over
    the name's tokens (a name may be several BPE tokens). All names go through in one batch;
    CLIP's causal attention makes the padding irrelevant to the name's rows.
    """
    names = list(names)
    if not names:
        raise ValueError("names is empty")
    if not backbone.is_conditional:
        raise ValueError(f"{backbone.name or 'this backbone'} has no text encoder")
    template = prompt_template(backbone) if template is None else check_template(template)
    prompts = [template.format(n) for n in names]
    spans = [token_span(backbone.prompt_tokenizer, p, n) for p, n in zip(prompts, names)]
    hidden = backbone.encode_prompt(prompts).embeds.float()           # (K, L, D)
    return torch.stack([hidden[i, s].mean(0) for i, s in enumerate(spans)])


# ---------------------------------------------------------------------------- loss
def bce_loss(logits: torch.Tensor, target_masks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy over the (image, query) pairs where ``valid`` is True.

    logits: ``(N, Q, H, W)``; target_masks: ``(N, Q, h, w)`` bool/float, resized (nearest) to
    (H, W) if they differ; valid: ``(N, Q)`` bool (None = all). Pairs with valid False contribute
    nothing -- the paper trains "without zero masks": a class the labeller missed is not a
    negative. Each valid pair weighs the same (per-pair pixel mean, then mean over pairs). With
    no valid pair the loss is a zero that still has a grad_fn (so ``backward()`` is a no-op).
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (N, Q, H, W); got {tuple(logits.shape)}")
    if target_masks.ndim != 4 or target_masks.shape[:2] != logits.shape[:2]:
        raise ValueError(f"target_masks must be (N, Q, h, w) = ({logits.shape[0]}, {logits.shape[1]}, h, w); "
                         f"got {tuple(target_masks.shape)}")
    if valid is None:
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if tuple(valid.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"valid must be (N, Q) = {tuple(logits.shape[:2])}; got {tuple(valid.shape)}")
    w = valid.to(logits.device, torch.float32)                          # (N, Q)
    target = target_masks.to(logits.device, torch.float32)
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
    # weights instead of logits[valid]: boolean indexing (and `if valid.any()`) would wait for the
    # device every step; a zero weight gives the pair's loss and gradient exactly 0
    per_pair = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean((-2, -1))
    return (per_pair * w).sum() / w.sum().clamp_min(1.0)
