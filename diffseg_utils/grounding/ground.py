"""One call for grounding: class names in, masks out, for generated or given images.

>>> res = ground(bb, gm, ["a photo of a star and a ring"], ["star", "ring"], num_steps=20)   # doctest: +SKIP
>>> res.labels      # (1, 64, 64) int64: 0 background, k = names[k - 1]
>>> res.masks       # (1, 2, 64, 64) bool, one per name
>>> res.scores      # (1, 2, 64, 64) float32 sigmoid probabilities

:func:`ground_explorer` wraps it in a small ipywidgets panel (type a name, pick a seed).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..backbones import Backbone, Conditioning
from ..inputs import Geometry, ImageLike, restore_labels
from .features import feature_groups, generate_with_features
from .module import GroundingModule, class_embeddings, query_template

__all__ = ["GroundingResult", "ground", "ground_explorer"]


@dataclass
class GroundingResult:
    """What :func:`ground` returns. Maps are at each input image's own size (generated images: the
    backbone's resolution R); with input images of different sizes the map fields are lists of
    per-image tensors instead of stacked tensors.

    images:      ``(B, 3, R, R)`` float in [-1, 1]: the generated images, or the inputs as the model saw them.
    labels:      ``(B, H, W)`` int64: 0 = background, ``k`` = ``class_names[k - 1]`` (the name with the
                 highest score where any name's score exceeds the module's threshold).
    masks:       ``(B, Q, H, W)`` bool, one per name: score > threshold (masks may overlap; labels do not).
    scores:      ``(B, Q, H, W)`` float32 in [0, 1]: sigmoid of the module's logits.
    class_names: the Q names, in query order.
    prompts:     the B prompts the features were computed with.
    """

    images: torch.Tensor
    labels: torch.Tensor | list[torch.Tensor]
    masks: torch.Tensor | list[torch.Tensor]
    scores: torch.Tensor | list[torch.Tensor]
    class_names: tuple[str, ...]
    prompts: list[str]


def _labels_from_scores(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(Q, H, W)`` or ``(B, Q, H, W)`` scores -> labels without the Q axis (0 = none above threshold)."""
    best, arg = scores.max(dim=-3)
    return torch.where(best > threshold, arg + 1, torch.zeros_like(arg))


@torch.no_grad()
def _features_of_images(backbone: Backbone, x: torch.Tensor, prompts: list[str], *, num_steps: int,
                        guidance_scale: float, feature_step: int, seed: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Grounding features of real images: the latent noised to the timestep that generation's ``feature_step``
    would use, one UNet pass (``[uncond; cond]`` with guidance), blocks grouped as in generation."""
    t = backbone.sampler(num_steps).timesteps[feature_step].item()
    z0 = backbone.encode(x)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=g).to(z0.device, z0.dtype)
    zt = backbone.add_noise(z0, t, noise)
    use_cfg = guidance_scale != 1.0
    cond = backbone.encode_prompt(prompts)
    if use_cfg:
        cond = Conditioning.cat([backbone.empty_prompt(len(prompts)), cond])
        zt = torch.cat([zt, zt])
    groups = feature_groups(backbone)
    names = [n for ns in groups.values() for n in ns]
    with backbone.capture(names, transform=lambda o: o.detach().to(dtype)) as cap:
        backbone.predict(zt, t, cond)
    snap = {n: torch.cat(cap.outputs[n].chunk(2), dim=1) if use_cfg else cap.outputs[n] for n in names}
    return {r: torch.cat([snap[b] for b in ns], dim=1) for r, ns in groups.items()}


@torch.no_grad()
def ground(
    backbone: Backbone,
    module: GroundingModule,
    images_or_prompts: str | Sequence[str] | ImageLike | Sequence[ImageLike],
    names: Sequence[str],
    *,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int | Sequence[int] = 0,
    feature_step: int = -1,
    template: str | None = None,
    fit: str = "pad",
) -> GroundingResult:
    """Segment every class in ``names`` with the grounding ``module``, in one call.

    images_or_prompts:
        * prompts (a string or a list of strings): one image is generated per prompt (DDIM,
          ``num_steps``, ``guidance_scale``, ``seed``: one seed for the batch or one per prompt) and the
          features are taken in the same pass (the paper's setting);
        * images (PIL / numpy / torch, any size; :mod:`diffseg_utils.inputs`): each is fitted to the
          backbone's square input (``fit="pad"`` letterboxes, so no part of a non-square image is
          lost; ``"crop"`` loses the sides, which get label 0 and score 0), encoded, noised to the
          timestep generation's ``feature_step`` would use (seed ``seed``) and passed once through
          the UNet conditioned on ``template.format("n1 and a n2 ...")``. The module was trained on
          generated images, so on real images this is an extrapolation (the paper does not do it).
    names:  the Q class names to segment in every image (each becomes a text query in the
            template the module was trained with, which must be the backbone's).

    Returns a :class:`GroundingResult`: ``labels`` (B, H, W) int64, ``masks`` (B, Q, H, W) bool and
    ``scores`` (B, Q, H, W) float32 at the input images' own size (generated: R x R), on the
    backbone's device.
    """
    names = [str(n) for n in ([names] if isinstance(names, str) else names)]
    if not names:
        raise ValueError("names is empty: pass the class names to segment, e.g. ['star', 'ring']")
    tpl = query_template(backbone, module, template)
    queries = class_embeddings(backbone, names, tpl)                                   # (Q, D)
    texts = [images_or_prompts] if isinstance(images_or_prompts, str) else images_or_prompts
    geo: Geometry | None = None
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(p, str) for p in texts):
        prompts = list(texts)
        gen = generate_with_features(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                                     feature_step=feature_step)
        images, feats = gen.images, gen.features
    else:
        if not isinstance(seed, int):
            raise TypeError("with images, seed is one int (the noise added to every image's latent)")
        images, geo = backbone.preprocess(images_or_prompts, fit=fit, return_geometry=True)
        prompts = [tpl.format(" and a ".join(names))] * images.shape[0]
        feats = _features_of_images(backbone, images, prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                                    feature_step=feature_step, seed=seed, dtype=torch.float16)
    n, size = images.shape[0], images.shape[-1]
    was = module.training
    module.eval()
    try:
        scores = module(feats, queries[None].expand(n, -1, -1), out_size=size).sigmoid()  # (B, Q, R, R)
    finally:
        module.train(was)
    thr = module.config.threshold
    if geo is not None:
        restored = restore_labels(scores, geo)   # bilinear; crop: unseen sides get score 0
        if isinstance(restored, list):
            return GroundingResult(images, [_labels_from_scores(s, thr) for s in restored], [s > thr for s in restored],
                                   restored, tuple(names), prompts)
        scores = restored
    return GroundingResult(images, _labels_from_scores(scores, thr), scores > thr, scores, tuple(names), prompts)


def ground_explorer(backbone: Backbone, module: GroundingModule, name: str, *, seed: int = 0,
                    unseen: Sequence[str] = (), num_steps: int = 20, guidance_scale: float = 5.0, max_seed: int = 99):
    """Generate ``template.format(name)`` and show its grounded mask; a text box and a seed slider redraw it.
    On an MM-DiT a third panel shows the name's ConceptAttention map on the same image (concepts: the name
    and "background"; the image noised to t = 500, one forward).

    Draws the figure once, as an ordinary output (so a static render of the notebook shows it),
    then shows the controls; each change replaces that figure in place. Names in ``unseen`` get a
    "*" explained in the figure. Needs a live kernel to react. Returns None.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from ..joint_attention import concept_attention, has_joint_blocks
    from ..viz import figure_with_controls, label_legend, show_image, show_labels
    from .prompts import prompt_template

    tpl = prompt_template(backbone)
    joint = has_joint_blocks(backbone)

    def figure(text: str, s: int):
        text = text.strip() or name
        res = ground(backbone, module, tpl.format(text), [text], num_steps=num_steps, guidance_scale=guidance_scale, seed=s)
        star = "*" if text in unseen else ""
        fig, axes = plt.subplots(1, 3 if joint else 2, figsize=(6.9 if joint else 4.6, 2.3))
        show_image(res.images[0], axes[0], title=f'"{tpl.format(text)}"\nseed {s}')
        show_labels(res.labels[0].cpu(), axes[1],
                    title=f"grounded '{text}{star}': {res.masks[0, 0].float().mean():.0%} of pixels")
        if joint:
            ca = concept_attention(backbone, (res.images[:1].float() + 1) / 2, [text, "background"], seed=s)
            axes[2].imshow(ca.maps[0, 0].cpu(), cmap="magma", vmin=0, vmax=1)
            axes[2].set_axis_off()
            axes[2].set_title(f"ConceptAttention '{text}'\nvs background (bright = '{text}')", fontsize=8)
        label_legend(axes[-1], ["background", text], unseen=[text] if star else ())
        fig.tight_layout()
        return fig

    w_name = widgets.Text(name, description="category", continuous_update=False)
    w_seed = widgets.IntSlider(seed, 0, max_seed, description="seed", continuous_update=False)
    figure_with_controls(lambda: figure(w_name.value, w_seed.value), [w_name, w_seed],
                         "(controls: a category name and a seed; they need a live kernel)")
