"""ControlledAttnProcessor: equal to diffusers' processors, fused attention where no probabilities are
needed, and attention injection without a per-element copy of the probabilities."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from diffseg_utils.attention import ControlledAttnProcessor


def _layer(kind: str) -> Attention:
    torch.manual_seed(0)
    if kind == "cross":      # SD's attn2: tokens attend to text
        return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    if kind == "self":       # SD's attn1
        return Attention(query_dim=16, heads=2, dim_head=8).eval()
    # UNet2DModel's spatial attention: (B, C, H, W) input, group norm, residual connection
    return Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval()


def _inputs(kind: str, b: int = 3):
    g = torch.Generator().manual_seed(1)
    if kind == "spatial":
        return torch.randn(b, 16, 4, 5, generator=g), None
    enc = torch.randn(b, 7, 12, generator=g) if kind == "cross" else None
    return torch.randn(b, 20, 16, generator=g), enc


def _run(attn: Attention, proc, x, enc, mask=None):
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=enc, attention_mask=mask)


@pytest.mark.parametrize("kind", ["cross", "self", "spatial"])
def test_fused_path_equals_classic_and_is_used(kind, monkeypatch):
    attn, (x, enc) = _layer(kind), _inputs(kind)
    ref = _run(attn, AttnProcessor(), x, enc)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.testing.assert_close(_run(attn, ControlledAttnProcessor(), x, enc), ref, atol=1e-5, rtol=1e-5)
    assert calls == [1]  # no probabilities needed: the fused kernel
    p = ControlledAttnProcessor(capture_probs=True)
    torch.testing.assert_close(_run(attn, p, x, enc), ref, atol=1e-5, rtol=1e-5)
    assert calls == [1]  # probabilities captured: explicit softmax
    n = x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]
    assert p.probs[0].shape == (x.shape[0] * 2, n, n if enc is None else enc.shape[1])
    torch.testing.assert_close(p.probs[0].sum(-1), torch.ones(x.shape[0] * 2, n))


def test_fused_path_with_attention_mask():
    attn, (x, enc) = _layer("cross"), _inputs("cross")
    mask = torch.ones(3, 7)
    mask[:, 5:] = 0  # padding tokens
    mask = ((1 - mask) * -10000.0)[:, None]  # (B, 1, L) additive bias, as the UNet passes it
    ref = _run(attn, AttnProcessor(), x, enc, mask)
    torch.testing.assert_close(_run(attn, ControlledAttnProcessor(), x, enc, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["cross", "self", "spatial"])
@pytest.mark.parametrize("src", [0, 2])
def test_injection_uses_one_elements_probabilities(kind, src):
    """Every element's output = element src's attention probabilities applied to its own values."""
    attn, (x, enc) = _layer(kind), _inputs(kind)
    p = ControlledAttnProcessor(capture_probs=True)
    p.inject_from = src
    out = _run(attn, p, x, enc)
    # reference: capture src's probabilities alone, then apply them to each element with plain bmm
    cap = ControlledAttnProcessor(capture_probs=True)
    _run(attn, cap, x[src:src + 1], None if enc is None else enc[src:src + 1])
    probs = cap.probs[0]                                                       # (heads, N, L)
    assert p.probs[0].shape == probs.shape  # the shared map is captured once, not per element
    torch.testing.assert_close(p.probs[0], probs)
    hs = attn.group_norm(x.flatten(2)).transpose(1, 2) if x.ndim == 4 else x
    values = attn.to_v(hs if enc is None else enc)                           # (B, L, heads * d)
    y = attn.batch_to_head_dim(torch.bmm(probs.repeat(x.shape[0], 1, 1), attn.head_to_batch_dim(values)))
    y = attn.to_out[0](y)
    if x.ndim == 4:
        y = y.transpose(1, 2).reshape(x.shape) + x
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)
    # element src itself is unchanged by injection
    torch.testing.assert_close(out[src], _run(attn, AttnProcessor(), x, enc)[src], atol=1e-5, rtol=1e-5)


def _allocated_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_injection_does_not_copy_probabilities_per_element():
    """Memory for the probabilities must not grow with the batch (the old `.repeat(B, 1, 1)` did:
    SD 1.5's up_blocks.3 self-attention at chunk 16 is ~4.6 GB per layer)."""
    attn = _layer("self")
    p = ControlledAttnProcessor()
    p.inject_from = 0
    attn.set_processor(p)
    n = 1024
    probs_bytes = 2 * n * n * 4  # one element's (heads, N, N) float32 map: 8 MB
    used = {}
    for b in (2, 6):
        x = torch.randn(b, n, 16)
        with torch.no_grad():
            used[b] = _allocated_bytes(lambda: attn(x))
    # 4 more elements: their activations (~0.5 MB each, measured) but never 4 more maps (8 MB each)
    assert used[6] - used[2] < probs_bytes, used
