"""Training-free maps from multi-modal diffusion transformers (SD3 / SD3.5, Flux, the toy MM-DiT).

* **ConceptAttention** (Helbling et al., ICML 2025): each concept ("cat", "background") is
  encoded on its own; its first token enters the transformer as an extra *concept* stream that
  goes through every joint block with the **text stream's own weights** (modulation, attention
  projections, MLP). Concept queries attend to [concepts, image] keys; nothing flows back into
  the image or text streams (generation is bitwise unchanged). The map of a layer is the dot
  product of image and concept tokens in the attention *output* space (before the output
  projections), softmaxed over concepts; layers and timesteps are averaged.
* **Joint cross-attention** (the transformer analog of DAAM; Seg4Diff reads it on SD3): the
  probabilities of image queries on the text keys of the joint softmax, averaged over heads.

>>> with JointAttentionMaps(bb, concepts=["circle", "background"], layers=[2, 3]) as jam:   # doctest: +SKIP
...     bb.predict(x_t, t, cond)
>>> jam.concept_maps              # (N, K, h, w), sums to 1 over K
>>> jam.maps                      # (N, L, h, w), image -> text-token probabilities
>>> jam.masks(prompts, [["circle"]], 64)          # joint cross-attention, DAAM's rule: (N, 1, 64, 64) bool
>>> jam.concept_masks([["circle"]], 64)           # ConceptAttention: argmax concept == "circle"

How the concept stream runs: after a joint block's normal forward (untouched), the block is
called once more with the concept tokens in place of the text tokens (Flux: at position zero)
and a single stand-in image token, its attention processor swapped for one whose concept
queries attend to the concept keys and to the image keys and values the normal forward just
computed; that call's text-stream output is the concept stream's next state. So the concept
tokens see exactly the weights the text tokens see, and the image stream is computed once (the
second call costs the K concept tokens, not a second pass over the image). Only joint blocks
whose text stream continues can carry it (not SD3's last block, ``context_pre_only``, nor Flux's
single-stream blocks, which have no separate text weights).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_maps import word_heatmaps
from .backbones import Backbone
from .backbones.base import tokens_to_map
from .inputs import restore_labels
from .text import token_span

__all__ = ["JointAttentionMaps", "JointMapsResult", "concept_attention", "concept_attention_miou", "joint_blocks",
           "has_joint_blocks", "concept_tokens"]


def _joint(backbone: Backbone) -> list[int]:
    blocks = getattr(backbone.denoiser, "transformer_blocks", None)
    return [i for i, b in enumerate(blocks or []) if getattr(b, "attn", None) is not None
            and getattr(b.attn, "to_add_out", None) is not None and hasattr(b, "norm1_context")]


def has_joint_blocks(backbone: Backbone) -> bool:
    """Whether the denoiser is an MM-DiT with joint text/image blocks (SD3 / SD3.5, Flux, toy-sd3)."""
    return bool(_joint(backbone))


def joint_blocks(backbone: Backbone) -> list[int]:
    """Indices ``i`` of ``transformer_blocks.{i}`` that are joint blocks with a text stream that continues."""
    out = _joint(backbone)
    if not out:
        raise ValueError(f"{type(backbone.denoiser).__name__} has no joint text/image blocks: ConceptAttention and "
                         "joint cross-attention need an MM-DiT (SD3 / SD3.5, Flux, toy-sd3); for UNets and PixArt "
                         "use the cross-attention maps (daam_segment)")
    return out


@torch.no_grad()
def concept_tokens(backbone: Backbone, concepts: Sequence[str]) -> torch.Tensor:
    """Each concept encoded on its own; the embedding of its first token: ``(K, joint_attention_dim)``.

    The token is found with the tokenizer whose tokens index the conditioning (after CLIP's BOS,
    T5's first), so multi-token concepts keep their first token only, as ConceptAttention does.
    """
    if not concepts:
        raise ValueError("concepts is empty; give at least two, e.g. ['cat', 'background']")
    tok = backbone.prompt_tokenizer
    rows = []
    for c in concepts:
        emb = backbone.encode_prompt([c]).embeds[0]
        rows.append(emb[token_span(tok, c, c)[0]])
    return torch.stack(rows)


class JointAttentionMaps:
    """Context manager: ConceptAttention and joint cross-attention maps during any denoiser calls.

    backbone: an MM-DiT backbone (joint blocks: see :func:`joint_blocks`).
    concepts: concept words for ConceptAttention (None: joint cross-attention only).
    layers:   indices of joint blocks whose maps are averaged (default: every eligible one).
    rows:     which batch rows to record: "all", or "second_half" for ``[uncond; cond]`` batches.
    cross:    also record the joint cross-attention maps (their probabilities are recomputed in float32,
              ``(B, heads, N, L + N)`` per layer and call: leave it off when only concept maps are wanted).

    Maps accumulate (float32, on the token grid) over every denoiser call inside the block;
    ``concept_maps`` / ``maps`` are the mean over calls and layers; :meth:`heatmaps` / :meth:`masks` turn
    ``maps`` into word maps exactly as :class:`~diffseg_utils.attention_maps.CrossAttentionMaps` does (DAAM's
    rule), :meth:`concept_masks` gives ConceptAttention's argmax masks of given concepts.
    """

    def __init__(self, backbone: Backbone, concepts: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 rows: str = "all", cross: bool = True):
        eligible = joint_blocks(backbone)
        self.layers = sorted(eligible if layers is None else {int(i) for i in layers})
        bad = [i for i in self.layers if i not in eligible]
        if bad:
            raise ValueError(f"layers {bad} are not joint blocks with a continuing text stream; eligible: {eligible}")
        if rows not in ("all", "second_half"):
            raise ValueError(f"rows must be 'all' or 'second_half', got {rows!r}")
        if concepts is None and not cross:
            raise ValueError("nothing to record: pass concepts=... and/or cross=True")
        self.backbone, self.rows, self.cross = backbone, rows, cross
        self.concepts = list(concepts) if concepts is not None else None
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self._concept_sum = self._cross_sum = None
        self._n = 0

    # ---------------------------------------------------------------- install / remove
    def __enter__(self) -> "JointAttentionMaps":
        if self._handles:
            raise RuntimeError("JointAttentionMaps is already installed")
        tr = self.backbone.denoiser
        self._c0 = None
        if self.concepts is not None:
            self._c0 = tr.context_embedder(concept_tokens(self.backbone, self.concepts).to(self.backbone.dtype))  # (K, W)
        self._handles.append(tr.register_forward_pre_hook(self._start_call))
        last = max(self.layers) if self.concepts is not None else -1  # the concept stream runs up to here
        carry = [i for i in joint_blocks(self.backbone) if i <= last]
        for i in sorted(set(carry) | set(self.layers)):
            block = tr.transformer_blocks[i]
            self._handles.append(block.register_forward_hook(
                lambda m, args, kwargs, out, i=i: self._after_block(i, m, kwargs, out), with_kwargs=True))
            attn = block.attn
            if self._c0 is not None and i in self.layers:  # the attention outputs the concept maps compare
                self._handles.append(attn.to_out[0].register_forward_pre_hook(lambda m, a, i=i: self._grab("img", i, a[0])))
                self._handles.append(attn.to_add_out.register_forward_pre_hook(lambda m, a, i=i: self._grab("txt", i, a[0])))
            grab = set()
            if self.cross and i in self.layers:  # the projections the joint probabilities are recomputed from
                grab |= {"to_q", "to_k", "add_k_proj"}
            if self._c0 is not None:             # the image keys and values the concept queries attend to
                grab |= {"to_k", "to_v"}
            for name in sorted(grab):
                self._handles.append(getattr(attn, name).register_forward_hook(
                    lambda m, a, out, i=i, name=name: self._grab(name, i, out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---------------------------------------------------------------- during a forward
    def _start_call(self, module, args) -> None:
        self._state = None       # the concept stream, (B, K, W)
        self._phase = "real"     # "real": the block's own call; "concept": our second call
        self._grabbed: dict = {}
        self._n += 1

    def _grab(self, what: str, i: int, t: torch.Tensor) -> None:
        self._grabbed[(self._phase, what, i)] = t

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x[x.shape[0] // 2:] if self.rows == "second_half" else x

    def _after_block(self, i: int, block, kwargs: dict, out) -> None:
        if self._phase != "real":
            return
        try:
            self._read_block(i, block, kwargs)
        finally:  # this block's grabbed projections are used up: hold one block's worth at a time
            for key in [k for k in self._grabbed if k[2] == i]:
                del self._grabbed[key]

    def _read_block(self, i: int, block, kwargs: dict) -> None:
        text = kwargs["encoder_hidden_states"]
        grid = self.backbone._grid
        if self.cross and i in self.layers:
            self._record_cross(i, block.attn, kwargs, text.shape[1], grid)
        if self._c0 is None:
            return
        B = text.shape[0]
        if self._state is None:  # the concept stream runs on the recorded rows only
            self._state = self._c0[None].expand(len(self._select(text)), -1, -1)
        # the block once more: concepts for text, one stand-in image token (its output is discarded); the
        # swapped processor takes the image keys / values from the call above
        kw = {k: self._select(v) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == B else v
              for k, v in kwargs.items()}
        kw["hidden_states"], kw["encoder_hidden_states"] = kw["hidden_states"][:, :1], self._state
        attn, proc = block.attn, block.attn.processor
        attn.processor = _ConceptStream(self, i, text.shape[1], kwargs.get("image_rotary_emb"))
        self._phase = "concept"
        try:
            new_state, _ = block.forward(**kw)  # not block(...): hooks on the block (feature captures) see one call
        finally:
            self._phase = "real"
            attn.processor = proc
        if i in self.layers:
            img = self._grabbed[("real", "img", i)]          # (B, N, W): image attention outputs, pre-projection
            con = self._grabbed[("concept", "txt", i)]       # (B', K, W): concept attention outputs, pre-projection
            sim = torch.einsum("bnw,bkw->bkn", self._select(img).float(), con.float())
            maps = sim.softmax(dim=1)                         # over concepts
            self._add("_concept_sum", tokens_to_map(maps.transpose(1, 2), grid))
        self._state = new_state

    def _record_cross(self, i: int, attn, kwargs: dict, L: int, grid) -> None:
        """Image-query probabilities on the text keys of the joint softmax, mean over heads: (B, L, h, w)."""
        g = self._grabbed
        d = attn.head_dim if hasattr(attn, "head_dim") else attn.inner_dim // attn.heads

        q = _heads(g[("real", "to_q", i)], d, getattr(attn, "norm_q", None))       # (B, N, heads, d)
        k_img = _heads(g[("real", "to_k", i)], d, getattr(attn, "norm_k", None))
        k_txt = _heads(g[("real", "add_k_proj", i)], d, getattr(attn, "norm_added_k", None))
        rot = kwargs.get("image_rotary_emb")
        if rot is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, tuple(r[L:] for r in rot), sequence_dim=1)
            k_img = apply_rotary_emb(k_img, tuple(r[L:] for r in rot), sequence_dim=1)
            k_txt = apply_rotary_emb(k_txt, tuple(r[:L] for r in rot), sequence_dim=1)
        q, k = self._select(q).float(), self._select(torch.cat([k_txt, k_img], 1)).float()
        logits = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)).mul_(getattr(attn, "scale", d ** -0.5))
        e = logits.sub_(logits.amax(-1, keepdim=True)).exp_()                # (B, heads, N, L + N), in place
        probs = (e[..., :L] / e.sum(-1, keepdim=True)).mean(1)               # (B, N, L): only the text columns
        self._add("_cross_sum", tokens_to_map(probs, grid))

    def _add(self, name: str, m: torch.Tensor) -> None:
        cur = getattr(self, name)
        setattr(self, name, m if cur is None else cur + m)

    # ---------------------------------------------------------------- results
    @property
    def concept_maps(self) -> torch.Tensor:
        """ConceptAttention maps ``(N, K, h, w)`` on the token grid, mean over calls and layers (sum 1 over K)."""
        if self._concept_sum is None:
            raise RuntimeError("no concept maps: pass concepts=... and run the denoiser inside the with block")
        return self._concept_sum / (self._n * len(self.layers))

    @property
    def maps(self) -> torch.Tensor:
        """Joint cross-attention maps ``(N, L, h, w)``: image-query probability on each text token."""
        if self._cross_sum is None:
            raise RuntimeError("no cross-attention maps: pass cross=True" if not self.cross
                               else "no maps recorded: run the denoiser inside the with block")
        return self._cross_sum / (self._n * len(self.layers))

    def heatmaps(self, prompts: Sequence[str], words_per_prompt: Sequence[Sequence[str]],
                 image_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Joint cross-attention word heat maps ``(N, W, H, W_img)`` in [0, 1] (DAAM's rule, see
        :func:`~diffseg_utils.attention_maps.word_heatmaps`); one prompt and word list per recorded row."""
        return word_heatmaps(self.maps, self.backbone.prompt_tokenizer, prompts, words_per_prompt,
                             image_size or self.backbone.resolution)

    def masks(self, prompts: Sequence[str], words_per_prompt: Sequence[Sequence[str]],
              image_size: int | tuple[int, int] | None = None, threshold: float = 0.4) -> torch.Tensor:
        """Boolean masks ``heatmaps(...) > threshold`` (DAAM's 0.4), shape ``(N, W, H, W_img)``."""
        return self.heatmaps(prompts, words_per_prompt, image_size) > threshold

    def concept_masks(self, concepts_per_row: Sequence[Sequence[str]],
                      image_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """ConceptAttention masks ``(N, W, H, W_img)`` bool: pixels whose most probable concept (maps bilinear
        to ``image_size``, argmax over all K concepts) is the row's w-th concept; W is the longest list and
        missing entries are empty. Every name must be one of this block's ``concepts``."""
        if self.concepts is None:
            raise RuntimeError("no concept maps: create JointAttentionMaps(..., concepts=[...])")
        maps = self.concept_maps
        rows = [[c] if isinstance(c, str) else list(c) for c in concepts_per_row]
        if len(rows) != maps.shape[0]:
            raise ValueError(f"got {len(rows)} concept lists for {maps.shape[0]} recorded rows; pass one per row")
        unknown = sorted({c for r in rows for c in r} - set(self.concepts))
        if unknown:
            raise ValueError(f"{unknown} are not among this block's concepts {self.concepts}; add them to concepts=")
        size = image_size or self.backbone.resolution
        size = (size, size) if isinstance(size, int) else tuple(size)
        labels = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).argmax(1)     # (N, H, W)
        width = max(len(r) for r in rows)
        idx = torch.tensor([[self.concepts.index(c) for c in r] + [-1] * (width - len(r)) for r in rows],
                           device=labels.device)                                                      # (N, W)
        return labels[:, None] == idx[:, :, None, None]


def _heads(x: torch.Tensor, d: int, norm=None) -> torch.Tensor:
    """(B, S, heads * d) -> (B, S, heads, d), with the attention's per-head norm when it has one."""
    x = x.unflatten(-1, (-1, d))
    return norm(x) if norm is not None else x


class _ConceptStream:
    """Attention processor of a joint block during the concept call: concept queries over [concept keys, the
    image keys of the block's normal forward]; returns (a zero stand-in image output, the concept outputs
    through ``to_add_out``). Used only inside :meth:`JointAttentionMaps._after_block`."""

    def __init__(self, maps: "JointAttentionMaps", i: int, text_len: int, rotary=None):
        self.maps, self.i, self.L, self.rotary = maps, i, text_len, rotary

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **_):
        m, i = self.maps, self.i
        d = attn.head_dim if hasattr(attn, "head_dim") else attn.inner_dim // attn.heads
        c = encoder_hidden_states
        q_c = _heads(attn.add_q_proj(c), d, getattr(attn, "norm_added_q", None))
        k_c = _heads(attn.add_k_proj(c), d, getattr(attn, "norm_added_k", None))
        v_c = _heads(attn.add_v_proj(c), d)
        k_img = m._select(_heads(m._grabbed[("real", "to_k", i)], d, getattr(attn, "norm_k", None)))
        v_img = m._select(_heads(m._grabbed[("real", "to_v", i)], d))
        if self.rotary is not None:  # Flux: image tokens at their positions, concepts at position zero (as text)
            from diffusers.models.embeddings import apply_rotary_emb

            zero = tuple(r[:1].expand(c.shape[1], -1) for r in self.rotary)
            q_c = apply_rotary_emb(q_c, zero, sequence_dim=1)
            k_c = apply_rotary_emb(k_c, zero, sequence_dim=1)
            k_img = apply_rotary_emb(k_img, tuple(r[self.L:] for r in self.rotary), sequence_dim=1)
        out = F.scaled_dot_product_attention(q_c.transpose(1, 2), torch.cat([k_c, k_img], 1).transpose(1, 2),
                                             torch.cat([v_c, v_img], 1).transpose(1, 2))
        out = out.transpose(1, 2).flatten(2).to(c.dtype)                          # (B', K, W)
        return hidden_states.new_zeros(hidden_states.shape[0], 1, attn.to_out[0].out_features), attn.to_add_out(out)


@dataclass
class JointMapsResult:
    """ConceptAttention on a batch of images: maps and labels at each image's size.

    maps:   (N, K, H, W) float32, softmax over the K concepts (averaged over layers and timesteps).
    labels: (N, H, W) int64, the argmax concept index.
    (Lists of per-image tensors when the input images differ in size.)
    """

    maps: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def concept_attention(backbone: Backbone, images, concepts: Sequence[str], *, timesteps: Sequence[float] = (500,),
                      layers: Sequence[int] | None = None, prompt: str = "", seed: int = 0,
                      size: int | None = None) -> JointMapsResult:
    """ConceptAttention on real images: each image noised to each ``t`` (one shared noise draw from ``seed``),
    one denoiser forward per ``t`` with the concept stream; maps at the input size.

    images:   anything :func:`~diffseg_utils.inputs.prepare_images` takes.
    concepts: K words, e.g. ``["cat", "background"]`` (the ImageNet-Segmentation protocol) or a class list.
    timesteps: noise levels (the backbone's ``t``; flow: ``t = 1000 s``).
    layers:   joint-block indices (default every eligible block; the paper's Flux choice is 15-18).
    prompt:   the text condition of the forward ("" = unconditional, as ConceptAttention on real images).
    """
    from .features import make_noise

    x, geo = backbone.preprocess(images, size=size, return_geometry=True)
    z0 = backbone.encode(x)
    cond = backbone.encode_prompt([prompt] * len(z0)) if prompt else backbone.empty_prompt(len(z0))
    eps = make_noise(backbone, len(z0), "shared", seed)
    with JointAttentionMaps(backbone, concepts=concepts, layers=layers, cross=False) as jam:
        for t in timesteps:
            backbone.predict(backbone.add_noise(z0, t, eps), t, cond)
    maps = restore_labels(jam.concept_maps, geo)  # bilinear from the token grid to each image's own size
    labels = [m.argmax(0) for m in maps] if isinstance(maps, list) else maps.argmax(1)
    return JointMapsResult(maps=maps, labels=labels)


def concept_attention_miou(backbone: Backbone, images, labels, class_names: Sequence[str], *,
                           background: str = "background", timesteps: Sequence[float] = (500,),
                           layers: Sequence[int] | None = None, seed: int = 0, batch_size: int = 16,
                           ignore_index: int = 255) -> tuple[float, "np.ndarray"]:
    """ConceptAttention as a zero-shot segmenter of labelled images (ConceptAttention's multi-class protocol):
    concepts = ``class_names`` + ``background``, each pixel to its most probable concept.

    images: (N, ...) anything :func:`concept_attention` takes; labels: (N, H, W) integers at the images' size,
    0 = background, ``k`` = ``class_names[k - 1]``, ``ignore_index`` ignored. Returns the mIoU over the classes
    present (``metrics.mean_iou``) and the per-class IoU ``(len(class_names) + 1,)`` (NaN where absent).
    """
    import numpy as np

    from .metrics import confusion_matrix, iou_per_class, miou_from_confusion

    k = len(class_names) + 1
    labels = torch.as_tensor(np.asarray(labels))
    cm = torch.zeros(k, k, dtype=torch.long)
    for s in range(0, len(labels), batch_size):
        res = concept_attention(backbone, images[s:s + batch_size], [*class_names, background], timesteps=timesteps,
                                layers=layers, seed=seed + s)
        pred = (res.labels.cpu() + 1) % k                       # concept j -> class j + 1; background (last) -> 0
        cm += confusion_matrix(pred, labels[s:s + batch_size], k, ignore_index)
    return miou_from_confusion(cm), iou_per_class(cm).numpy()

