"""The notebooks' findings, written from a run's own numbers (so a run on another backbone says what *it* found).

Each function returns Markdown; the notebook displays it. Numbers are the run's; comparison words
("beats", "below the floor") are decided from them. Paper figures are quoted as such.
"""
from __future__ import annotations

from .grounding.plots import METHOD_LABELS

__all__ = ["emerdiff_findings", "fewshot_findings", "probe_findings", "protocol_findings", "representation_findings",
           "single_class_findings", "token_study_findings"]


def _cmp(a: float, b: float, margin: float = 0.02) -> str:
    return "above" if a > b + margin else "below" if a < b - margin else "level with"


def probe_findings(probes: dict) -> str:
    """Notebook 00: the one-member probe (``probes``: "trained" / "untrained" / "raw RGB" ... ->
    :class:`~diffseg_utils.toy.quality.ProbeReport`) split into finding (fg IoU) and naming (class accuracy)."""
    tr = probes["trained"]
    un = probes.get("untrained")
    finds = "finds the objects well" if tr.fg_iou >= 0.7 else "finds the objects only partly"
    names = ("names them on most of their pixels" if tr.class_acc_on_fg >= 0.7 else
             f"names them on {tr.class_acc_on_fg:.0%} of their pixels")
    out = [f"**This run**: at its chosen place the trained denoiser's probe {finds} (fg IoU {tr.fg_iou:.3f}) and "
           f"{names} (class acc | fg {tr.class_acc_on_fg:.3f}); MLP mIoU {tr.mlp:.3f}."]
    if un is not None:
        out.append(f"The untrained copy at its own place: fg IoU {un.fg_iou:.3f}, class acc | fg {un.class_acc_on_fg:.3f}, "
                   f"mIoU {un.mlp:.3f}, so training added {tr.mlp - un.mlp:+.3f} mIoU.")
    return " ".join(out)


def representation_findings(scores: dict[str, float], best_t: int, best_block: str, rand_t: int,
                            t_curve: dict[int, float], noise: str = "shared") -> str:
    """Notebook 01: the chosen place against the floors (``scores``: the test mIoU of "trained denoiser, chosen
    place", "untrained denoiser, its chosen place", "raw RGB", "raw RGB + position") and the noise-level trend (``t_curve``:
    t -> mean validation mIoU over blocks, trained denoiser), in words."""
    tr, un = scores["trained denoiser, chosen place"], scores["untrained denoiser, its chosen place"]
    rgb, xy = scores["raw RGB"], scores["raw RGB + position"]
    out = [f"**This run**: the validation images chose `{best_block}` at t = {best_t}; on the test images its probe "
           f"scores {tr:.3f}, {_cmp(tr, un)} the untrained denoiser at its own place ({un:.3f}, t = {rand_t}) and "
           f"{_cmp(tr, max(rgb, xy))} the colour floors ({rgb:.3f} colour, {xy:.3f} colour + position)."]
    ts = sorted(t_curve)
    lo, hi = ts[0], ts[-1]
    out.append(f"Averaged over blocks, the validation probe goes from {t_curve[lo]:.3f} at t = {lo} to "
               f"{t_curve[hi]:.3f} at t = {hi} (the paper: small t most semantic, t ≥ 800 nearly uninformative).")
    if hi >= 900 and noise == "shared":
        out.append(f"At t = {hi} the input is almost only DDPM-Seg's noise image, shared by every image, so the "
                   "features differ little between images and a probe there mostly reads pixel position: compare it "
                   f"with the colour + position floor ({xy:.3f}), not with zero.")
    if rand_t >= 900:
        out.append(f"The untrained denoiser's best place is at t = {rand_t}: there its features encode position, "
                   "which is what it has to offer.")
    return " ".join(out)


def _paired(pd) -> str:
    """A :class:`~.metrics.PairedDifference` as a verdict: its bootstrap interval decides, not the means."""
    return "above" if pd.lo > 0 else "below" if pd.hi < 0 else "level with"


def fewshot_findings(mean: dict[str, float], std: dict[str, float], names: dict[str, str], n_splits: int,
                     paired: dict | None = None) -> str:
    """Notebook 02: the ensemble's test mIoU per variant (``mean`` / ``std`` over ``n_splits`` splits, keyed by the
    variant; ``names``: variant -> recorded key, e.g. "ddpm_miou", "untrained_miou", "rgb_miou", "rgbxy_miou",
    "paper_t_miou", "single_block_miou"), in words. ``paired``: recorded key -> the
    :class:`~.metrics.PairedDifference` of that variant minus the chosen one over the same splits; where given, its
    interval (not the difference of the means) decides "above" / "level with" / "below"."""
    by = {k: v for v, k in names.items()}
    paired = paired or {}
    d, u, r, xy = (mean[by[k]] for k in ("ddpm_miou", "untrained_miou", "rgb_miou", "rgbxy_miou"))
    out = [f"**This run** ({n_splits} disjoint splits): the ensemble on the chosen DDPM features scores {d:.3f} ± "
           f"{std[by['ddpm_miou']]:.3f}, {d - u:+.3f} over the untrained denoiser's same blocks ({u:.3f}) and "
           f"{d - max(r, xy):+.3f} over the best colour floor ({r:.3f} colour, {xy:.3f} colour + position)."]
    if "paper_t_miou" in by:
        p = mean[by["paper_t_miou"]]
        pd = paired.get("paper_t_miou")
        verdict = (f"{_paired(pd)} the validated choice (paired over the splits: {pd.mean:+.3f}, interval "
                   f"[{pd.lo:+.3f}, {pd.hi:+.3f}])" if pd is not None else f"{_cmp(p, d)} the validated choice")
        out.append(f"The paper's timesteps on the same blocks score {p:.3f}, {verdict}.")
    if "single_block_miou" in by:
        s1 = mean[by["single_block_miou"]]
        pd = paired.get("single_block_miou")
        better = pd.hi < 0 if pd is not None else d > s1 + 0.01
        out.append(f"The single best place alone scores {s1:.3f}: concatenating places is "
                   f"{'worth it' if better else 'not clearly better'} here.")
    return " ".join(out)


def token_study_findings(study) -> str:
    """What the token study (:func:`~.diagnostics.cross_attention_tokens`) measured, in words."""
    t = study.templates[0]
    iou = study.iou[t]
    cw, eot, sot, whole = iou["class word"], iou["end of text"], iou["start of text"], iou["whole image"]
    best = max((r for r in study.roles if r not in ("whole image", "class word, inverted")), key=lambda r: iou[r])
    out = [f"**Measured here** (template {t!r}, {study.pairs} scored one-object generations): the class word's "
           f"mask scores {cw:.3f} IoU, {_cmp(cw, whole)} the {whole:.3f} of predicting every pixel; the end-of-text "
           f"token's scores {eot:.3f} and the start-of-text token's {sot:.3f}. The best token map is the "
           f"**{best}**'s ({iou[best]:.3f})."]
    if cw < whole:
        out.append("The class word's map does not localise the object it names, so DAAM's premise fails on this "
                   "backbone; a token that scores high instead carries the prompt's content for the denoiser.")
    elif best == "class word":
        out.append("The maps follow the word that names the object, as DAAM presumes.")
    else:
        out.append(f"The class word's map localises the object it names, as DAAM presumes, {_cmp(cw, iou[best])} "
                   f"the {best} token's.")
    r = study.similarity[t]
    reading = ("near 1: the word is attended from the same pixels as a token that carries no content" if r > 0.8 else
               "negative: the word is attended where that token is not, from the object rather than the background"
               if r < -0.3 else "a weak relation: the two maps are read from different pixels")
    out.append(f"The class word's map correlates with the start-of-text token's at r = {r:.2f} ({reading}).")
    if len(study.templates) > 1:
        t2 = study.templates[1]
        d = study.iou[t2]["class word"] - cw
        out.append(f"Under the paper's template {t2!r} the class word's score moves by {d:+.3f}: the template "
                   f"{'is' if abs(d) > 0.05 else 'is not'} what decides it.")
    if "concept token" in study.roles:
        ct = iou["concept token"]
        out.append(f"ConceptAttention's map of the class (its own concept token, read in the attention-output "
                   f"space) scores {ct:.3f}, {_cmp(ct, cw)} the class word's joint cross-attention map.")
    return " ".join(out)


def protocol_findings(table: dict, rows: dict | None = None) -> str:
    """Protocol I (``table``: method -> {seen, unseen, harmonic}) and, when given, protocol II (``rows``: the
    training sets of :data:`~.grounding.protocol_two.SOURCES` -> {seen, unseen, harmonic}) in words, with the
    targets: synthetic seen >= 0.7 x the ground-truth reference, synthetic unseen >= 0.30 and above the seen-only
    ablation (its floor)."""
    g = table["grounding"]
    others = {m: r for m, r in table.items() if m != "grounding"}
    best = max(others, key=lambda m: others[m]["unseen"])
    b = others[best]
    beats = all(g["unseen"] > r["unseen"] for r in others.values())
    out = [f"**Protocol I, this run**: the grounding module reaches {g['seen']:.3f} mIoU on seen and {g['unseen']:.3f} "
           f"on unseen categories; the best training-free map on unseen categories, "
           f"{METHOD_LABELS.get(best, best)}, reaches {b['seen']:.3f} / {b['unseen']:.3f}. The module "
           + ("beats every training-free map on unseen categories, as the paper reports against DAAM."
              if beats else "does **not** beat every training-free map on unseen categories, unlike the paper's "
                            "result against DAAM.")]
    gap = g["unseen"] - g["seen"]
    out.append(f"Unseen categories score {abs(gap):.3f} {'above' if gap >= 0 else 'below'} seen ones.")
    if rows:
        syn, abl, ref = rows["grounded"], rows["segmenter_seen"], rows["truth_seen"]
        ratio = syn["seen"] / ref["seen"] if ref["seen"] > 0 else float("nan")
        met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
        out.append(f"\n\n**Protocol II, this run**: the segmenter trained on grounded synthetic data scores "
                   f"{syn['seen']:.3f} seen / {syn['unseen']:.3f} unseen (harmonic {syn['harmonic']:.3f}; the paper: "
                   f"74.4 harmonic on real VOC with a full-size segmenter). On seen classes that is {ratio:.2f}× the "
                   f"{ref['seen']:.3f} the same segmenter reaches trained on ground truth of seen classes (target ≥ 0.7×: "
                   f"{met(ratio >= 0.7)}). On unseen classes it is {_cmp(syn['unseen'], abl['unseen'])} the "
                   f"{abl['unseen']:.3f} of the same generations labelled without the module, seen classes only "
                   f"(target ≥ 0.30 and above that floor: {met(syn['unseen'] >= 0.30 and syn['unseen'] > abl['unseen'])}).")
    return " ".join(out)


def single_class_findings(result, chosen_t: dict) -> str:
    """The single-class protocol on real images (``result``: a :class:`~.grounding.single_class.SingleClassResult`
    per method, ``chosen_t``: method -> the t validation chose), in words, with bootstrap intervals."""
    rows = {m: (r.table()[m], r.interval(m)) for m, r in result.items()}
    maps = {m: v for m, v in rows.items() if m != "grounding"}
    best = max(maps, key=lambda m: maps[m][0]["miou"])
    (b, (lo, hi)) = maps[best]
    out = [f"**This run, one object per real image** ({len(result[best].classes)} test images): the best training-free "
           f"map is {METHOD_LABELS.get(best, best)} at {b['miou']:.3f} mIoU [{lo:.3f}, {hi:.3f}] (t = {chosen_t[best]:g}, "
           f"chosen on validation images; foreground IoU {b['fg_iou']:.3f})."]
    for m, (r, (lo, hi)) in maps.items():
        if m != best:
            out.append(f"{METHOD_LABELS.get(m, m)}: {r['miou']:.3f} [{lo:.3f}, {hi:.3f}].")
    floor = max(result[best].table(floors=True).items(), key=lambda kv: kv[1]["miou"])
    out.append(f"Read it against the best mask that knows nothing, \"{floor[0]}\" at {floor[1]['miou']:.3f} mIoU "
               f"(small objects leave a high background IoU): the best map is {_cmp(b['miou'], floor[1]['miou'])} it.")
    if "grounding" in rows:
        (g, (lo, hi)) = rows["grounding"]
        out.append(f"The grounding module, trained on generated images only, reaches {g['miou']:.3f} [{lo:.3f}, {hi:.3f}], "
                   f"{_cmp(g['miou'], b['miou'])} the best map.")
    out.append("Published on ImageNet-Segmentation (real photographs, the same protocol): ConceptAttention with Flux "
               "71.0, DAAM with SDXL 64.6, with SD 2 47.6.")
    return " ".join(out)


def emerdiff_findings(results: dict[str, float], best: dict, ablation: dict[str, float] | None = None,
                      paired=None) -> str:
    """Notebook 03: the validation choice (``best`` from ``choose_emerdiff_settings``), the test scores
    (``results``: method name -> mean Hungarian mIoU), the validation ablations and the paired EmerDiff −
    bilinear difference (a :class:`~diffseg_utils.metrics.PairedDifference`), in words."""
    e, b = results["EmerDiff"], results["bilinear upsampling"]
    out = [f"**This run**: the validation images chose λ = {best['lam']:g}, the modulated layer "
           f"`{best['modulate_layer'] or 'the k-means layer'}` and t_m = {best['t_m']} (paper: λ = 10, the k-means "
           f"layer, 281). On the test images EmerDiff scores {e:.3f}, {_cmp(e, b, 0.005)} the {b:.3f} of bilinear "
           f"upsampling of its own segments ({e - b:+.3f}), and k-means on upsampled features scores "
           f"{results['k-means on upsampled features']:.3f}."]
    if paired is not None:
        sure = paired.lo > 0 or paired.hi < 0
        out.append(f"Paired over the {paired.n} test images the difference is {paired}: "
                   + ("its 95% interval excludes zero." if sure else "its 95% interval includes zero, so this run "
                      "cannot tell the two apart."))
    p = results.get("EmerDiff, paper settings")
    if p is not None:
        out.append(f"With the paper's settings EmerDiff scores {p:.3f} ({_cmp(p, b, 0.005)} bilinear upsampling).")
    if ablation and "no attention injection" in ablation:
        chosen = next(v for k, v in ablation.items() if k.endswith("(chosen)"))
        d = ablation["no attention injection"] - chosen
        out.append(f"Without attention injection the validation score moves by {d:+.3f}.")
    return " ".join(out)
