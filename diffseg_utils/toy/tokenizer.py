"""A small CLIP tokenizer built locally (no download): byte-level BPE, CLIP's special tokens.

The vocabulary holds CLIP's 512 byte symbols (so *any* text tokenizes, unknown words as
pieces) plus whole-word tokens for the toy world's words. It is saved with
``save_pretrained`` and loads as a ``transformers.CLIPTokenizer`` like SD's own.
"""
from __future__ import annotations

import json
from pathlib import Path

from .world import CATEGORIES

WORDS: tuple[str, ...] = ("a", "an", "the", "of", "and", "photo", "photograph", "picture", *CATEGORIES)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(syms: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Apply BPE merges to a symbol list the way CLIP does (best-ranked adjacent pair first)."""
    rank = {m: i for i, m in enumerate(merges)}
    while len(syms) > 1:
        pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(syms, syms[1:]))]
        r, i = min(pairs)
        if r == 1 << 30:
            break
        syms = syms[:i] + [syms[i] + syms[i + 1]] + syms[i + 2:]
    return syms


def build_tokenizer_files(out_dir: str | Path, words: tuple[str, ...] = WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE tokenizer into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab: list[str] = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for w in words:
        # add merges until BPE (lowest-rank pair first, as CLIP applies it) yields one token
        while len(syms := _bpe(list(w[:-1]) + [w[-1] + "</w>"], merges)) > 1:
            merges.append((syms[0], syms[1]))
            if syms[0] + syms[1] not in seen:
                vocab.append(syms[0] + syms[1])
                seen.add(syms[0] + syms[1])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return out


def build_tokenizer(out_dir: str | Path, model_max_length: int = 16):
    """Build, save and return a ``CLIPTokenizer`` whose toy-world words are single tokens."""
    from transformers import CLIPTokenizer

    out = build_tokenizer_files(out_dir)
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    for w in WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {w!r} did not become one token: {ids}")
    tok.save_pretrained(str(out))
    return tok



def make_portable(pipeline_dir: str | Path) -> None:
    """Make an exported pipeline readable by transformers 4 as well as 5 (same weights, same tokens).

    transformers 5 saves a tokenizer as ``tokenizer.json`` only and a ``CLIPTextModel``'s weights without the
    ``text_model.`` prefix; transformers 4's ``CLIPTokenizer`` needs ``vocab.json`` / ``merges.txt``, and its
    ``CLIPTextModel`` would silently re-initialise unprefixed weights. Both versions read the prefixed names.
    """
    from safetensors.torch import load_file, save_file

    root = Path(pipeline_dir)
    for sub in sorted(root.glob("tokenizer*")):
        if (sub / "tokenizer.json").exists():
            build_tokenizer_files(sub)
    for f in sorted(root.glob("text_encoder*/model.safetensors")):
        sd = load_file(f)
        if any(not k.startswith(("text_model.", "text_projection.")) for k in sd):
            save_file({k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
                       for k, v in sd.items()}, f, metadata={"format": "pt"})
