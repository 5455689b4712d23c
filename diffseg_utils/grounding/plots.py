"""Figures of notebook 04 (grounding): each explains itself (legend of class colours, "*" = unseen).

Every function draws one figure and returns it; the caller shows it. Class colours are the label
ids of ``["background", *class_names]`` in :func:`diffseg_utils.viz.label_palette`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..viz import label_legend, show_image, show_labels

__all__ = ["show_shards", "show_protocol_one", "show_token_study", "show_loss"]


def _star(name: str, unseen: Sequence[str]) -> str:
    return f"{name}*" if name in unseen else name


def show_shards(shards, k: int = 8, unseen: Sequence[str] = ()):
    """The first ``k`` samples of a :class:`~.shards.GroundingShards`: each image with its prompted names, and
    the labeler's masks as one label map (a missed class is named under the map)."""
    import matplotlib.pyplot as plt

    k = min(k, len(shards))
    names = ["background", *shards.class_names]
    lab = shards.index_masks()[:k]
    fig, axes = plt.subplots(2, k, figsize=(1.45 * k + 1.2, 3.3), squeeze=False)
    for i in range(k):
        s = shards[i]
        show_image(s["image"], axes[0, i], title="\n".join(_star(n, unseen) for n in s["names"]))
        missed = [n for n, v in zip(s["names"], s["valid"]) if not v]
        show_labels(lab[i], axes[1, i], image=s["image"], title=("missed: " + ", ".join(missed)) if missed else "")
    label_legend(axes[1, -1], names, lab, unseen=unseen)
    fig.suptitle("top: generated images and their prompted classes; bottom: the labeler's masks "
                 "(a class it missed gives no loss term)", fontsize=8)
    fig.tight_layout()
    return fig


METHOD_LABELS = {"grounding": "grounding module", "daam": "cross-attention (DAAM)",
                 "joint_cross_attention": "joint cross-attention", "concept_attention": "ConceptAttention"}
"""How figures name protocol I's methods."""


def show_protocol_one(result, unseen: Sequence[str], k: int = 4):
    """Up to ``k`` unseen and ``k`` seen (image, class) pairs of a protocol-I result that the segmenter found:
    the image, the segmenter's mask (the truth), then each method's mask (the grounding module, the attention maps)."""
    import matplotlib.pyplot as plt

    ex = result.examples
    names = ["background", *result.class_names]
    pairs = [(i, w) for i, ns in enumerate(ex["names"]) for w, c in enumerate(ns) if ex["oracle"][i][w].any()]
    cols = [p for p in pairs if ex["names"][p[0]][p[1]] in unseen][:k]
    cols += [p for p in pairs if ex["names"][p[0]][p[1]] not in unseen][:k]
    rows = [("oracle", "segmenter (truth)")] + [(m, METHOD_LABELS.get(m, m)) for m in result.iou]
    fig, axes = plt.subplots(1 + len(rows), max(len(cols), 1), figsize=(1.45 * max(len(cols), 1) + 1.2,
                                                                        1.6 * (1 + len(rows))), squeeze=False)
    used = torch.zeros(len(names), dtype=torch.bool)
    for j, (i, w) in enumerate(cols):
        c, img = ex["names"][i][w], ex["images"][i]
        cid = names.index(c)
        used[cid] = True
        show_image(img, axes[0, j], title=_star(c, unseen))
        for r, (key, label) in enumerate(rows, 1):
            show_labels(ex[key][i][w].long() * cid, axes[r, j], title=label)   # beside the image, not over it
    label_legend(axes[1, -1], names, torch.nonzero(used).flatten(), unseen=unseen)
    fig.suptitle("each column: one prompted class in one generated image; a good method's mask (rows 3 on) "
                 "matches the segmenter's (row 2)", fontsize=8)
    fig.tight_layout()
    return fig


def show_token_study(study, k: int = 3, roles: Sequence[str] | None = None):
    """For each template of a :class:`~.diagnostics.TokenStudy`: ``k`` generations, the segmenter's mask and
    the heat map of each token role (default: class word, end of text, and the concept token where the study
    has it; bright = attended)."""
    import matplotlib.pyplot as plt

    if roles is None:
        roles = [r for r in ("class word", "end of text", "concept token") if r in study.roles]
    ncol = 2 + len(roles)
    rows = [(t, i) for t in study.templates if t in study.examples
            for i in range(min(k, len(study.examples[t]["prompts"])))]
    if not rows:
        fig, ax = plt.subplots(figsize=(5, 1))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no scored example: the segmenter found none of the prompted objects", ha="center")
        return fig
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.6 * ncol, 1.75 * len(rows)), squeeze=False)
    for r, (t, i) in enumerate(rows):
        ex = study.examples[t]
        show_image(ex["images"][i], axes[r, 0], title=f'"{ex["prompts"][i]}"')
        show_labels(ex["truth"][i].long(), axes[r, 1], image=ex["images"][i], title="segmenter (truth)")
        for c, role in enumerate(roles, 2):
            axes[r, c].imshow(ex["maps"][role][i].cpu(), cmap="magma", vmin=0, vmax=1)
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"{role} map", fontsize=8)
    fig.suptitle("attention heat maps of prompt tokens (summed over steps, min-max normalised; concept token: "
                 "its probability; bright = attended)\nunder each prompt template, same initial noise", fontsize=8)
    fig.tight_layout()
    return fig


def show_loss(history: list[dict], ax=None):
    """The training loss curve (``[{"step", "loss"}, ...]``) of the grounding module."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 2.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("BCE (EMA 0.95)")
    ax.set_title("grounding module training (seen classes only)", fontsize=9)
    ax.figure.tight_layout()
    return ax.figure


def show_protocol_two(curve: dict):
    """Protocol II's curve (``curve[source][n]``: :func:`~.protocol_two.protocol_two_curve`'s results): seen and unseen
    mIoU against the training-set size, one line per training set."""
    import matplotlib.pyplot as plt

    from .protocol_two import SOURCES

    fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
    for ax, part in zip(axes, ("seen", "unseen")):
        for s, style in zip(SOURCES, ("o-", "s--", "^:")):
            if s in curve:
                ns = sorted(curve[s])
                ax.plot(ns, [curve[s][n][part] for n in ns], style, label=SOURCES[s])
        ax.set_xscale("log")
        ns = sorted({n for v in curve.values() for n in v})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("training images")
        ax.set_title(f"{part} classes", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test mIoU")
    axes[1].legend(fontsize=7)
    fig.suptitle("protocol II: the same segmenter trained on each set, scored on labelled test images", fontsize=9)
    fig.tight_layout()
    return fig
