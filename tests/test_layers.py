"Shared layers against PyTorch and Hugging Face `transformers` on random inputs; masks, cache, estimators, bad inputs."
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_from_scratch.generation import KVCache
from llm_from_scratch.layers import (
    DTYPE_BYTES, GatedFeedForward, GroupedQueryAttention, MoEFeedForward, RMSNorm, SiLU, apply_rope, calc_kv_bytes_total,
    causal_mask, compute_rope_params, distribute_layers, estimate_params_and_hidden, estimate_totals, kv_cache_bytes,
    rope_inv_freq,
)

transformers = pytest.importorskip("transformers")
from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config, Qwen3MoeConfig  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: E402


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def llama_config(**kw):
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
    return LlamaConfig(**{**base, **kw})


# RMSNorm ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (3, 16), (2, 5, 32)])
def test_rmsnorm_matches_torch(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3
    ours = RMSNorm(shape[-1], eps=1e-5)
    nn.init.uniform_(ours.weight, -2, 2)
    ref = nn.RMSNorm(shape[-1], eps=1e-5)
    ref.weight = ours.weight
    close(ours(x), ref(x))


def test_rmsnorm_matches_llama_and_gemma():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 24)
    ours, llama = RMSNorm(24, eps=1e-6), modeling_llama.LlamaRMSNorm(24, eps=1e-6)
    nn.init.normal_(ours.weight)
    llama.weight = ours.weight
    close(ours(x), llama(x))
    gemma_ours, gemma = RMSNorm(24, eps=1e-6, unit_offset=True), modeling_gemma3.Gemma3RMSNorm(24, eps=1e-6)
    nn.init.normal_(gemma_ours.weight)
    gemma.weight = gemma_ours.weight
    close(gemma_ours(x), gemma(x))
    xb = x.bfloat16()                                  # Gemma computes in float32 and casts once: identical bits
    gemma_ours.bfloat16()
    gemma.bfloat16()
    assert torch.equal(gemma_ours(xb), gemma(xb))


def test_rmsnorm_float32_statistics():
    "A bfloat16 input is normalized with float32 statistics (a bfloat16 mean of squares would be off)."
    x = torch.randn(2, 4096).bfloat16() * 100
    out = RMSNorm(4096)(x)
    assert out.dtype == torch.bfloat16
    ref = (x.float() / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).bfloat16()
    assert torch.equal(out, ref)


# Activations and feed-forward ------------------------------------------------------------------------------------

def test_silu_matches_functional():
    x = torch.linspace(-20, 20, 1001)
    close(SiLU()(x), F.silu(x), 1e-6)


def _copy_mlp(ours, hf):
    ours.fc1.weight, ours.fc2.weight, ours.fc3.weight = hf.gate_proj.weight, hf.up_proj.weight, hf.down_proj.weight


def test_swiglu_matches_llama_mlp():
    torch.manual_seed(2)
    hf = modeling_llama.LlamaMLP(llama_config())
    ours = GatedFeedForward(32, 48)
    _copy_mlp(ours, hf)
    x = torch.randn(3, 5, 32)
    close(ours(x), hf(x))


def test_geglu_matches_gemma_mlp():
    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, hidden_activation="gelu_pytorch_tanh")
    hf = modeling_gemma3.Gemma3MLP(cfg)
    ours = GatedFeedForward(32, 40, activation="gelu_tanh")
    _copy_mlp(ours, hf)
    x = torch.randn(2, 7, 32)
    close(ours(x), hf(x))


def test_unknown_activation():
    with pytest.raises(ValueError, match="Unknown activation 'relu'"):
        GatedFeedForward(8, 8, activation="relu")
    with pytest.raises(ValueError, match="Unknown activation"):
        MoEFeedForward(8, 8, 2, 1, activation="gelu")


# RoPE ------------------------------------------------------------------------------------------------------------

ROPE_CASES = {
    "default": ({"rope_theta": 10_000.0}, None),
    "llama3": ({"rope_theta": 500_000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
               {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 32}),
    "llama32": ({"rope_theta": 500_000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
                {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192}),
    "linear": ({"rope_theta": 1_000_000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, {"rope_type": "linear", "factor": 8.0}),
}


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_tables_match_hf(case, head_dim):
    hf_kw, freq = ROPE_CASES[case]
    cfg = llama_config(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=4096, **hf_kw)
    rotary = modeling_llama.LlamaRotaryEmbedding(cfg)
    close(rope_inv_freq(head_dim, hf_kw["rope_theta"], freq), rotary.inv_freq, 1e-7)
    positions = torch.arange(4096)[None]
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = compute_rope_params(head_dim, hf_kw["rope_theta"], 4096, freq)
    close(cos, hf_cos[0], 1e-5)
    close(sin, hf_sin[0], 1e-5)


def test_apply_rope_matches_hf():
    torch.manual_seed(4)
    cos, sin = compute_rope_params(32, 10_000.0, 128)
    q, k = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 9, 32)
    pos = torch.stack([torch.arange(9) + 50, torch.arange(9)])              # (b, T): different positions per row
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, cos[pos], sin[pos])
    close(apply_rope(q, cos[pos], sin[pos]), hf_q)
    close(apply_rope(k, cos[pos], sin[pos]), hf_k)
    close(apply_rope(q[:1], cos, sin, offset=50), hf_q[:1])                  # table + offset
    close(apply_rope(q[1:], cos[:9], sin[:9]), hf_q[1:])                     # gathered (T, head_dim)
    assert apply_rope(q.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_rope_bad_inputs():
    with pytest.raises(ValueError, match="even head_dim"):
        compute_rope_params(15)
    with pytest.raises(ValueError, match="'low_freq_factor'"):
        rope_inv_freq(16, 10_000, {"factor": 8.0, "high_freq_factor": 4.0, "original_context_length": 8192})
    with pytest.raises(ValueError, match="unknown rope_type 'yarn'"):
        rope_inv_freq(16, 10_000, {"rope_type": "yarn", "factor": 4.0})
    cos, sin = compute_rope_params(8, context_length=10)
    with pytest.raises(ValueError, match="RoPE tables cover 10 positions"):
        apply_rope(torch.zeros(1, 1, 4, 8), cos, sin, offset=8)


# Masks -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,S,window", [(1, 1, None), (5, 5, None), (3, 9, None), (6, 6, 2), (2, 10, 4), (4, 4, 10), (1, 7, 1)])
def test_causal_mask_against_loops(T, S, window):
    m = causal_mask(T, S, window)
    assert m.shape == (T, S) and m.dtype == torch.bool
    for i in range(T):
        qi = S - T + i
        for j in range(S):
            assert m[i, j].item() == (j > qi or (window is not None and qi - j >= window))


def test_causal_mask_matches_cache_mask():
    c = KVCache(n_layers=1, batch_size=1, n_kv_heads=1, head_dim=2, max_len=16)
    c.advance(7)
    for window in (None, 1, 3, 20):
        assert torch.equal(c.mask(3, window)[0, 0], causal_mask(3, 10, window))


def test_causal_mask_bad_inputs():
    with pytest.raises(ValueError, match="3 queries"):
        causal_mask(3, 2)
    with pytest.raises(ValueError, match="window"):
        causal_mask(3, window=0)


# Grouped-query attention -----------------------------------------------------------------------------------------

def naive_attention(att, x, cos, sin, window=None):
    "Independent reference: per query head, explicit scores, additive -inf mask, softmax."
    b, T, _ = x.shape
    q = att.W_query(x).view(b, T, att.num_heads, att.head_dim).transpose(1, 2)
    k = att.W_key(x).view(b, T, att.num_kv_groups, att.head_dim).transpose(1, 2)
    v = att.W_value(x).view(b, T, att.num_kv_groups, att.head_dim).transpose(1, 2)
    if att.q_norm is not None:
        q, k = att.q_norm(q), att.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = torch.empty(b, T, att.num_heads, att.head_dim)
    for h in range(att.num_heads):
        g = h * att.num_kv_groups // att.num_heads
        for i in range(T):
            s = (q[:, h, i, None, :] * k[:, g]).sum(-1) * att.scaling      # (b, T)
            for j in range(T):
                if j > i or (window is not None and i - j >= window):
                    s[:, j] = -math.inf
            out[:, i, h] = (torch.softmax(s, -1)[:, :, None] * v[:, g]).sum(1)   # (b, head_dim)
    return att.out_proj(out.reshape(b, T, -1))


@pytest.mark.parametrize("heads,groups,head_dim,kw", [
    (4, 4, None, {}), (4, 2, None, {}), (4, 1, None, {}), (6, 3, 4, {}), (4, 2, 12, {"qk_norm": True}),
    (8, 2, 8, {"query_pre_attn_scalar": 30.0, "qk_norm": True, "norm_unit_offset": True}),
    (4, 2, None, {"sliding_window": 3}), (4, 2, None, {"qkv_bias": True}),
])
def test_gqa_matches_naive(heads, groups, head_dim, kw):
    torch.manual_seed(5)
    att = GroupedQueryAttention(32, heads, groups, head_dim=head_dim, **kw)
    for p in att.parameters():
        if p.ndim == 1:
            nn.init.normal_(p, 0, 0.5)
    x = torch.randn(2, 7, 32)
    cos, sin = compute_rope_params(att.head_dim, context_length=7)
    with torch.no_grad():
        close(att(x, None, cos, sin), naive_attention(att, x, cos, sin, kw.get("sliding_window")))


def _hf_mask(T):
    return torch.zeros(T, T).masked_fill(causal_mask(T), -torch.inf)[None, None]   # additive, (1, 1, T, T)


def test_gqa_matches_llama_attention():
    torch.manual_seed(6)
    cfg = llama_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    cfg._attn_implementation = "eager"
    hf = modeling_llama.LlamaAttention(cfg, layer_idx=0)
    ours = GroupedQueryAttention(64, 8, 2)
    ours.W_query.weight, ours.W_key.weight, ours.W_value.weight = hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight
    ours.out_proj.weight = hf.o_proj.weight
    x = torch.randn(2, 10, 64)
    cos, sin = compute_rope_params(8, 10_000.0, 10)
    with torch.no_grad():
        ref = hf(x, position_embeddings=(cos[None], sin[None]), attention_mask=_hf_mask(10))[0]
        close(ours(x, None, cos, sin), ref)


def test_gqa_matches_qwen3_attention_with_qk_norm():
    torch.manual_seed(7)
    cfg = Qwen3Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    hf = modeling_qwen3.Qwen3Attention(cfg, layer_idx=0)
    nn.init.normal_(hf.q_norm.weight)
    nn.init.normal_(hf.k_norm.weight)
    ours = GroupedQueryAttention(48, 4, 2, head_dim=16, qk_norm=True, norm_eps=1e-6)
    ours.W_query.weight, ours.W_key.weight, ours.W_value.weight = hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight
    ours.out_proj.weight, ours.q_norm.weight, ours.k_norm.weight = hf.o_proj.weight, hf.q_norm.weight, hf.k_norm.weight
    x = torch.randn(2, 9, 48)
    cos, sin = compute_rope_params(16, 1_000_000.0, 9)
    with torch.no_grad():
        ref = hf(x, position_embeddings=(cos[None], sin[None]), attention_mask=_hf_mask(9))[0]
        close(ours(x, None, cos, sin), ref)


class _Holder(nn.Module):
    def __init__(self, att, cfg):
        super().__init__()
        self.att, self.cfg = att, cfg


@pytest.mark.parametrize("window", [None, 1, 3, 5])
def test_gqa_cache_equals_full_pass(window):
    "Prefill then decode through a KVCache equals one pass, past the sliding window too."
    torch.manual_seed(8)
    att = GroupedQueryAttention(32, 4, 2, qk_norm=True, sliding_window=window)
    x = torch.randn(2, 12, 32)
    cos, sin = compute_rope_params(8, context_length=12)
    cfg = {"n_layers": 1, "n_heads": 4, "n_kv_groups": 2, "emb_dim": 32, "context_length": 12}
    cache = KVCache.for_model(_Holder(att, cfg), batch_size=2)
    assert cache.layers[0].keys.shape == (2, 2, 12, 8)        # the cache holds the key-value heads only
    outs = []
    with torch.no_grad():
        for start, stop in [(0, 4)] + [(i, i + 1) for i in range(4, 12)]:
            pos = cache.positions(stop - start)
            outs.append(att(x[:, start:stop], None, cos[pos], sin[pos], cache=cache.layers[0]))
            cache.advance(stop - start)
        close(torch.cat(outs, 1), att(x, None, cos, sin))
        # a precomputed mask (the cache's, without the window) gets the layer's window added
        cache.reset()
        pos = cache.positions(12)
        out = att(x, cache.mask(12), cos[pos], sin[pos], cache=cache.layers[0])
        close(out, att(x, None, cos, sin))


def test_gqa_left_padding_with_cache():
    "A left-padded row, with positions from the cache, gives the unpadded row's outputs."
    torch.manual_seed(9)
    att = GroupedQueryAttention(32, 4, 2, sliding_window=3)
    cos, sin = compute_rope_params(8, context_length=16)
    x = torch.randn(1, 6, 32)
    padded = torch.cat([torch.randn(1, 2, 32), x], dim=1)        # two padding slots in front
    batch = torch.cat([padded, torch.cat([x, torch.randn(1, 2, 32)], 1)])  # row 1: no padding (other tokens)
    cache = KVCache(1, 2, 2, 8, 16)
    cache.reset(torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]))
    pos = cache.positions(8)
    with torch.no_grad():
        out = att(batch, None, cos[pos], sin[pos], cache=cache.layers[0])
        close(out[0, 2:], att(x, None, cos, sin)[0])


def test_gqa_bad_configs():
    with pytest.raises(ValueError, match="divisible by num_kv_groups"):
        GroupedQueryAttention(32, 4, 3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GroupedQueryAttention(30, 4, 2)
    with pytest.raises(ValueError, match="sliding_window"):
        GroupedQueryAttention(32, 4, 2, sliding_window=0)
    att = GroupedQueryAttention(30, 4, 2, head_dim=6)             # an explicit head_dim need not divide d_in
    assert att.W_query.weight.shape == (24, 30) and att.out_proj.weight.shape == (30, 24)


# Mixture of experts ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_qwen3_moe_block(norm_topk_prob):
    torch.manual_seed(10)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3,
                         norm_topk_prob=norm_topk_prob, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    hf = modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    for p in hf.parameters():
        nn.init.normal_(p, 0, 0.3)
    ours = MoEFeedForward(32, 16, 6, 3, norm_topk_prob=norm_topk_prob)
    ours.gate.weight = nn.Parameter(hf.gate.weight.detach().clone())
    for e in range(6):
        gate, up = hf.experts.gate_up_proj[e].detach().chunk(2, dim=0)
        ours.fc1[e].weight, ours.fc2[e].weight = nn.Parameter(gate.clone()), nn.Parameter(up.clone())
        ours.fc3[e].weight = nn.Parameter(hf.experts.down_proj[e].detach().clone())
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        close(ours(x), hf(x))


def test_moe_shapes_and_bad_config():
    moe = MoEFeedForward(16, 8, 4, 2)
    assert moe.num_experts_per_tok == 2 and len(moe.fc1) == len(moe.fc2) == len(moe.fc3) == 4
    assert moe(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEFeedForward(16, 8, 4, 5)


# Estimators ------------------------------------------------------------------------------------------------------

def test_kv_estimators_against_bytes_of_a_real_cache():
    cfg = {"n_layers": 2, "n_heads": 6, "n_kv_groups": 3, "head_dim": 5, "emb_dim": 12, "context_length": 10, "dtype": torch.float16}
    holder = _Holder(nn.Linear(1, 1, dtype=torch.float16), cfg)
    cache = KVCache.for_model(holder, batch_size=3)
    assert kv_cache_bytes(cfg, batch_size=3) == sum(lc.keys.nbytes + lc.values.nbytes for lc in cache.layers)
    # head_dim from emb_dim / n_heads, as the book's estimator computes it
    book = calc_kv_bytes_total(3, 10, 30, 6, 3, 2, DTYPE_BYTES["fp16"])
    assert book == kv_cache_bytes({**cfg, "head_dim": None, "emb_dim": 30}, batch_size=3)


def test_distribute_layers_and_swa():
    assert distribute_layers(32, 5, 1) == (27, 5)
    assert distribute_layers(18, 5, 1) == (15, 3)   # Gemma 3 270M: 18 layers
    assert distribute_layers(7, 1, 0) == (7, 0)
    with pytest.raises(ValueError, match="a:b"):
        distribute_layers(4, 0, 0)
    with pytest.raises(ValueError, match="swa_ratio"):
        estimate_totals(1024, 128, 64, 4, 4, 2, swa_ratio="5-1")
    est = estimate_totals(1024, 4096, 64, 4, 4, 2, swa_ratio="1:1")
    assert est["total_mixed_gqa"] == est["total_gqa_allfull"]   # the window is longer than the context


def test_kv_cache_bytes_layer_types():
    cfg = {"n_layers": 3, "n_heads": 2, "emb_dim": 8, "context_length": 100, "sliding_window": 10,
           "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
    per_token = 2 * 4 * 2 * 4   # heads * head_dim * (k, v) * float32
    assert kv_cache_bytes(cfg) == (10 + 10 + 100) * per_token
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        kv_cache_bytes({**cfg, "n_layers": 4})
    with pytest.raises(ValueError, match="'n_heads'"):
        kv_cache_bytes({"n_layers": 1})


def test_moe_estimator_matches_module():
    r = estimate_params_and_hidden(64, 256, "swiglu", num_experts=4, match_dense=True, top_k=2)
    with torch.device("meta"):
        moe = MoEFeedForward(64, r["moe_hidden_dim"], 4, 2)
    assert r["moe_total"] == sum(p.numel() for p in moe.parameters())
    assert r["moe_active"] == moe.gate.weight.numel() + 2 * sum(p.numel() for m in (moe.fc1, moe.fc2, moe.fc3) for p in m[0].parameters())
    with pytest.raises(ValueError, match="ffn_type"):
        estimate_params_and_hidden(64, 256, "relu")


def test_gqa_without_sdpa_enable_gqa(monkeypatch):
    "PyTorch < 2.5 has no `enable_gqa`: the key-value heads are repeated instead, with the same result."
    import llm_from_scratch.layers as layers
    torch.manual_seed(11)
    att = GroupedQueryAttention(32, 8, 2, sliding_window=4)
    x = torch.randn(2, 9, 32)
    cos, sin = compute_rope_params(4, context_length=9)
    with torch.no_grad():
        fused = att(x, None, cos, sin)
        monkeypatch.setattr(layers, "_SDPA_GQA", False)
        close(att(x, None, cos, sin), fused)
        close(fused, naive_attention(att, x, cos, sin, window=4))
