"KV cache and generation: cached == uncached (tokens and logits), left padding, streaming, eos, no copies, bad inputs."
import pytest
import torch
from torch import nn

from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel, generate_text_simple
from llm_from_scratch.generation import KVCache, generate, generate_stream, relayout_weights

VOCAB = 53


def tiny_gpt(attn_impl='book', qkv_bias=False, context_length=16, seed=0, n_layers=2, n_heads=2, emb_dim=16):
    torch.manual_seed(seed)
    cfg = {**GPT_CONFIG_124M, 'vocab_size': VOCAB, 'context_length': context_length, 'emb_dim': emb_dim, 'n_heads': n_heads,
           'n_layers': n_layers, 'drop_rate': 0.0, 'qkv_bias': qkv_bias, 'attn_impl': attn_impl}
    return GPTModel(cfg).eval()


class Recorder(nn.Module):
    "Wraps a model and records the last position's logits of every call (and the caches it was given)."
    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.logits, self.caches = model, model.cfg, [], []

    def forward(self, idx, cache=None):
        out = self.model(idx, cache=cache)
        self.logits.append(out[:, -1].clone())
        self.caches.append(cache)
        return out


class NoCacheModel(nn.Module):
    "A model whose forward takes no cache (the book's signature): generate must fall back to the uncached loop."
    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def forward(self, idx):
        return self.model(idx)


def uncached_logits(model, idx, max_new_tokens, context_size):
    "The book's loop, recording each step's last-position logits: the independent reference."
    logits_seen = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1]
        logits_seen.append(logits)
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx, logits_seen


# --- the cache on its own --------------------------------------------------------------------------------------------

def test_update_writes_in_place_and_returns_views():
    c = KVCache(n_layers=2, batch_size=2, n_kv_heads=3, head_dim=4, max_len=10)
    layer = c.layers[1]
    k1, v1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    keys, values = layer.update(k1, v1)
    assert keys.shape == (2, 3, 4, 4) and keys.data_ptr() == layer.keys.data_ptr()
    torch.testing.assert_close(keys, k1)
    torch.testing.assert_close(values, v1)
    c.advance(4)
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    keys, values = layer.update(k2, v2)
    assert keys.shape == (2, 3, 5, 4)
    torch.testing.assert_close(keys, torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(values, torch.cat([v1, v2], dim=2))


def test_positions_mask_and_advance_without_padding():
    c = KVCache(1, 1, 1, 2, max_len=6)
    torch.testing.assert_close(c.positions(3), torch.arange(3))
    torch.testing.assert_close(c.mask(3)[0, 0], torch.ones(3, 3, dtype=torch.bool).triu(1))
    c.advance(3)
    torch.testing.assert_close(c.positions(2), torch.tensor([3, 4]))
    m = c.mask(2)
    assert m.shape == (1, 1, 2, 5)
    torch.testing.assert_close(m[0, 0], torch.ones(2, 5, dtype=torch.bool).triu(4))  # query 3 sees 0..3, query 4 sees 0..4
    assert c.layers[0].mask(2) is m  # one mask per forward pass, shared by the layers
    c.advance(2)
    assert c.offset == 5 and c.mask(1).shape == (1, 1, 1, 6) and not c.mask(1).any()


def test_sliding_window_mask():
    c = KVCache(1, 1, 1, 2, max_len=8)
    c.advance(4)
    allowed = ~c.mask(2, window=3)[0, 0]  # queries at slots 4, 5 see themselves and the 2 slots before
    assert allowed.int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    full, windowed = c.mask(2), c.mask(2, window=3)  # layers of both kinds (Gemma 3) share each mask
    assert c.mask(2) is full and c.mask(2, window=3) is windowed and not torch.equal(full, windowed)


def test_overflow_raises_and_reset_clears():
    c = KVCache(1, 1, 1, 2, max_len=4)
    c.advance(3)
    with pytest.raises(ValueError, match='overflow'):
        c.positions(2)
    with pytest.raises(ValueError, match='overflow'):
        c.layers[0].update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match='overflow'):
        c.advance(2)
    c.reset()
    assert c.offset == 0
    c.advance(4)


def test_left_padding_positions_and_mask():
    c = KVCache(1, 3, 1, 2, max_len=6)
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    c.reset(am)
    torch.testing.assert_close(c.positions(4), torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0]]))
    m = c.mask(4)
    assert m.shape == (3, 1, 4, 4)
    # independent reference: a real query at slot i sees real keys j <= i; a pad query sees only itself
    for r in range(3):
        for i in range(4):
            for j in range(4):
                if am[r, i]:
                    expected = j > i or not am[r, j]
                else:
                    expected = j != i
                assert bool(m[r, 0, i, j]) == expected, (r, i, j)
    c.advance(4)
    torch.testing.assert_close(c.positions(1), torch.tensor([[2], [4], [1]]))
    assert c.mask(1)[:, 0, 0].tolist() == [[True, True, False, False, False], [False] * 5, [True, True, True, False, False]]


@pytest.mark.parametrize('am', [torch.tensor([[1, 1, 0]]), torch.tensor([[0, 0, 0]]), torch.tensor([[1, 0, 1]]),
                                torch.ones(2, 3), torch.ones(1, 9)])
def test_bad_padding_masks(am):
    with pytest.raises(ValueError, match='attention_mask'):
        KVCache(1, 1, 1, 2, max_len=8).reset(am)


def test_bad_sizes_and_batch_mismatch():
    for bad in [{'n_layers': 0}, {'batch_size': 0}, {'max_len': 0}, {'head_dim': 1.5}]:
        args = {'n_layers': 1, 'batch_size': 1, 'n_kv_heads': 1, 'head_dim': 2, 'max_len': 4} | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            KVCache(**args)
    c = KVCache(1, 2, 1, 2, max_len=4)
    with pytest.raises(ValueError, match='batch'):
        c.layers[0].update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_for_model_reads_config_device_and_dtype():
    model = tiny_gpt(n_layers=3, n_heads=4, emb_dim=32, context_length=12).to(torch.float64)
    c = KVCache.for_model(model, batch_size=2)
    assert len(c.layers) == 3 and c.max_len == 12
    assert c.layers[0].keys.shape == (2, 4, 12, 8) and c.layers[0].keys.dtype == torch.float64
    assert KVCache.for_model(model, max_len=5).max_len == 5
    with pytest.raises(ValueError, match='max_len'):
        KVCache.for_model(model, max_len=13)

    class GQAModel(nn.Module):  # a later architecture's config: fewer key-value heads, an explicit head size
        def __init__(self):
            super().__init__()
            self.cfg = {'n_layers': 2, 'n_heads': 8, 'n_kv_groups': 2, 'head_dim': 16, 'emb_dim': 64, 'context_length': 32}
            self.w = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
    c = KVCache.for_model(GQAModel())
    assert c.layers[1].values.shape == (1, 2, 32, 16) and c.layers[1].values.dtype == torch.bfloat16

    class NoConfig(nn.Module):
        pass
    with pytest.raises(ValueError, match='n_layers'):
        KVCache.for_model(NoConfig())


# --- cached generation == uncached generation ------------------------------------------------------------------------

@pytest.mark.parametrize('attn_impl', ['book', 'sdpa'])
@pytest.mark.parametrize('T', [1, 4, 15, 16, 21])
def test_greedy_tokens_and_logits_equal_uncached(attn_impl, T):
    model = tiny_gpt(attn_impl, qkv_bias=T % 2 == 1, seed=T)
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
    rec = Recorder(model)
    out = generate(rec, idx, 30)                  # runs 30 + T tokens past the context of 16 for every T
    ref, ref_logits = uncached_logits(model, idx, 30, 16)
    assert torch.equal(out, ref)
    assert torch.equal(out, generate_text_simple(model, idx, 30, 16))
    assert len(rec.logits) == 30
    for got, want in zip(rec.logits, ref_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sum(c is not None and c.offset == c.max_len for c in rec.caches) > 0  # the cache really filled up


@pytest.mark.parametrize('context_size', [1, 5, 16])
def test_context_size_smaller_than_the_model(context_size):
    model = tiny_gpt('sdpa', seed=3)
    idx = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, idx, 25, context_size), generate_text_simple(model, idx, 25, context_size))
    assert torch.equal(generate(model, idx, 25, context_size, use_cache=False), generate_text_simple(model, idx, 25, context_size))


def test_cache_is_used_and_not_copied():
    model = tiny_gpt()
    rec = Recorder(model)
    idx = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(0))
    real_cat, cats = torch.cat, []

    def counting_cat(*args, **kwargs):
        cats.append(1)
        return real_cat(*args, **kwargs)

    addresses = []
    orig_advance = KVCache.advance

    def advance(self, T):  # record where the storage lives after each forward pass
        addresses.append([(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in self.layers])
        return orig_advance(self, T)

    torch.cat = counting_cat
    KVCache.advance = advance
    try:
        out = generate(rec, idx, 10)
    finally:
        torch.cat = real_cat
        KVCache.advance = orig_advance
    assert out.shape == (1, 13) and not cats  # no concatenation anywhere in a cached generation
    assert rec.caches[0] is not None and len({id(c) for c in rec.caches}) == 1  # one cache for the whole generation
    assert len(addresses) == 10 and all(a == addresses[0] for a in addresses)  # prefill + 9 decode steps, same storage
    assert rec.caches[0].max_len == 13  # sized prompt + new tokens, not the whole context


def test_decode_steps_feed_one_token():
    model = tiny_gpt()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    generate(model, torch.zeros(1, 5, dtype=torch.long), 8)
    assert seen == [5] + [1] * 7
    seen.clear()
    generate(model, torch.zeros(1, 14, dtype=torch.long), 5)  # context 16: 14, 1, 1, then the full window each step
    assert seen == [14, 1, 1, 16, 16]


# --- batches with left padding ----------------------------------------------------------------------------------------

def left_pad(prompts, pad_id=0):
    T = max(len(p) for p in prompts)
    idx = torch.stack([torch.cat([torch.full((T - len(p),), pad_id), p]) for p in prompts])
    am = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)]) for p in prompts])
    return idx, am


@pytest.mark.parametrize('attn_impl', ['book', 'sdpa'])
def test_left_padded_batch_equals_each_prompt_alone(attn_impl):
    model = tiny_gpt(attn_impl, qkv_bias=True, seed=5)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (T,), generator=g) for T in (2, 11, 6, 1)]
    idx, am = left_pad(prompts, pad_id=7)
    rec = Recorder(model)
    out = generate(rec, idx, 20, attention_mask=am)  # the 11-token row runs past the context of 16
    assert out.shape == (4, 31)
    for i, p in enumerate(prompts):
        alone, alone_logits = uncached_logits(model, p[None], 20, 16)
        assert torch.equal(out[i, idx.shape[1] - len(p):], alone[0])
        for got, want in zip(rec.logits, alone_logits):
            torch.testing.assert_close(got[i], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(model, idx, 20, attention_mask=am, use_cache=False), out)


def test_pad_token_values_do_not_matter():
    model = tiny_gpt(seed=9)
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([9])]
    idx0, am = left_pad(prompts, pad_id=0)
    idx1, _ = left_pad(prompts, pad_id=VOCAB - 1)
    assert not torch.equal(idx0, idx1)
    a = generate(model, idx0, 6, attention_mask=am)
    b = generate(model, idx1, 6, attention_mask=am)
    assert torch.equal(a[:, 3:], b[:, 3:])


def test_all_ones_mask_is_no_padding():
    model = tiny_gpt(seed=4)
    idx = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(model, idx, 15, attention_mask=torch.ones_like(idx)), generate(model, idx, 15))


# --- sampling, eos, streaming -----------------------------------------------------------------------------------------

def test_sampling_matches_uncached_with_the_same_seed():
    model = tiny_gpt('sdpa', seed=1)
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    a = generate(model, idx, 25, temperature=1.3, top_k=10)
    torch.manual_seed(11)
    b = generate(model, idx, 25, temperature=1.3, top_k=10, use_cache=False)
    assert torch.equal(a, b)
    c = generate(model, idx, 25, temperature=1.3, generator=torch.Generator().manual_seed(5))
    d = generate(model, idx, 25, temperature=1.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c, d)
    assert torch.equal(generate(model, idx, 25, temperature=5.0, top_k=1), generate(model, idx, 25))


def test_top_k_samples_only_among_the_top_k():
    model = tiny_gpt(seed=2)
    rec = Recorder(model)
    idx = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(0))
    out = generate(rec, idx, 12, temperature=10.0, top_k=3, generator=torch.Generator().manual_seed(0))
    for step, logits in enumerate(rec.logits):
        top3 = logits.topk(3, dim=-1).indices
        assert (top3 == out[:, 3 + step, None]).any(dim=1).all()


def test_eos_stops_single_and_batch():
    model = tiny_gpt(seed=6)
    idx = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(6))
    full = generate(model, idx, 20)
    new = full[:, 4:]
    eos = int(new[0, 5])
    first = [row.tolist().index(eos) if eos in row.tolist() else None for row in new]
    # batch of one: the book's behaviour, stop before the eos token
    one = generate(model, idx[:1], 20, eos_id=eos)
    assert torch.equal(one[0], full[0, :4 + first[0]])
    # a batch: rows that finished repeat eos until all have; stop when all have
    out = generate(model, idx, 20, eos_id=eos)
    stop = max((f if f is not None else 20) for f in first)
    assert out.shape[1] == 4 + min(stop, 20)
    for row, f in zip(range(3), first):
        got = out[row, 4:]
        if f is None:
            assert torch.equal(got, new[row, :got.shape[0]])
        else:
            assert torch.equal(got[:f], new[row, :f]) and (got[f:] == eos).all()
    # an eos that never comes changes nothing
    absent = next(t for t in range(VOCAB) if t not in full.tolist()[0] + full.tolist()[1] + full.tolist()[2])
    assert torch.equal(generate(model, idx, 20, eos_id=absent), full)


def test_stream_equals_generate():
    model = tiny_gpt(seed=8)
    idx = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    tokens = list(generate_stream(model, idx, 25))
    assert all(isinstance(t, int) for t in tokens)
    assert tokens == generate(model, idx, 25)[0, 5:].tolist()
    eos = tokens[3]
    assert list(generate_stream(model, idx, 25, eos_id=eos)) == tokens[:tokens.index(eos)]
    batch = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(9))
    steps = list(generate_stream(model, batch, 12))
    assert all(s.shape == (3,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), generate(model, batch, 12)[:, 5:])


def test_stream_is_lazy_and_leaves_grad_mode_alone():
    model = tiny_gpt()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    stream = generate_stream(model, torch.zeros(1, 2, dtype=torch.long), 5)
    assert not calls
    next(stream)
    assert len(calls) == 1 and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with pytest.raises(ValueError, match='top_k'):
        generate_stream(model, torch.zeros(1, 2, dtype=torch.long), 5, top_k=0)  # checked at the call, not at next()


def test_output_is_an_ordinary_tensor():
    model = tiny_gpt()
    out = generate(model, torch.zeros(1, 2, dtype=torch.long), 3)
    out[0, 0] = 1  # an inference-mode tensor would refuse this
    assert not out.requires_grad and out.dtype == torch.long
    assert torch.equal(generate(model, torch.zeros(2, 3, dtype=torch.long), 0), torch.zeros(2, 3, dtype=torch.long))


def test_model_without_cache_argument_falls_back():
    model = tiny_gpt(seed=10)
    plain = NoCacheModel(model)
    idx = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(plain, idx, 20), generate_text_simple(model, idx, 20, 16))
    with pytest.raises(ValueError, match='cache'):
        generate(plain, idx, 3, attention_mask=torch.ones_like(idx))


@pytest.mark.parametrize('kwargs, match', [
    ({'max_new_tokens': -1}, 'max_new_tokens'),
    ({'temperature': -0.1}, 'temperature'),
    ({'temperature': float('nan')}, 'temperature'),
    ({'temperature': float('inf')}, 'temperature'),
    ({'top_k': 2.5}, 'top_k'),
    ({'top_k': 0}, 'top_k'),
    ({'top_k': VOCAB + 1}, 'top_k'),
    ({'context_size': 0}, 'context_size'),
    ({'context_size': 17}, 'context_size'),
    ({'attention_mask': torch.ones(2, 2)}, 'attention_mask'),
    ({'attention_mask': torch.tensor([[1, 0, 1]])}, 'attention_mask'),
    ({'idx': torch.zeros(3, dtype=torch.long)}, 'idx'),
    ({'idx': torch.zeros(1, 0, dtype=torch.long)}, 'idx'),
    ({'idx': torch.zeros(1, 3)}, 'idx'),
])
def test_bad_arguments(kwargs, match):
    model = tiny_gpt()
    args = {'model': model, 'idx': torch.zeros(1, 3, dtype=torch.long), 'max_new_tokens': 4} | kwargs
    with pytest.raises(ValueError, match=match):
        generate(**args)
    with pytest.raises(ValueError, match=match):
        generate_stream(**args)


# --- weight layout -------------------------------------------------------------------------------------------------

def test_relayout_weights_keeps_values_and_parameters():
    model = tiny_gpt('sdpa', qkv_bias=True, seed=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        logits = model(idx)
    tokens = generate(model, idx, 20)
    assert relayout_weights(model) is model
    assert dict(model.named_parameters()) == params  # the same Parameter objects (an optimizer keeps working)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.shape == before[k].shape
    for m in model.modules():
        if isinstance(m, nn.Linear):
            widening = m.out_features >= m.in_features
            assert m.weight.is_contiguous() != widening
            assert m.weight.t().is_contiguous() == widening
    with torch.no_grad():
        torch.testing.assert_close(model(idx), logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(model, idx, 20), tokens)
    relayout_weights(model)  # idempotent
    assert not model.out_head.weight.is_contiguous() and model.out_head.weight.t().is_contiguous()
    loss = model(idx).sum()
    loss.backward()  # still trainable
    assert model.out_head.weight.grad.shape == model.out_head.weight.shape
