"""Where a word sits in a tokenised prompt (shared by cross-attention maps and grounding queries)."""
from __future__ import annotations


def token_span(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``tokenizer(prompt).input_ids`` (BOS at position 0).

    Works for CLIP's BPE (a word may be several tokens) and any ``transformers`` tokenizer.
    Raises ``ValueError`` naming the prompt and word when the word's tokens do not occur in it.
    """
    ids = tokenizer(prompt, truncation=True).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    if sub:
        for i in range(len(ids) - len(sub) + 1):
            if ids[i:i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
    raise ValueError(f"the word {word!r} does not occur in the tokenised prompt {prompt!r} "
                     f"(or was truncated at {getattr(tokenizer, 'model_max_length', '?')} tokens); "
                     "pass a word that appears in the prompt")
