"Sampling settings: one check for every entry point, and sampling that stays finite at both ends of the temperature range."
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from llm_from_scratch import generation as kv_cache, pretrain
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.generation import _next_token, generate, generate_stream

VOCAB = 53
TINY_T = [1e-45, 5e-324, 1e-300, 1e-38]            # positive, but logits / T overflows or T rounds to 0
HUGE_T = [1e308, sys.float_info.max, 1e39, 7e4]    # finite; all but 7e4 round to inf in float32
ORDINARY_T = [0.1, 0.5, 0.7, 1.0, 1.4, 2.0, 5.0, 10.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    cfg = {**GPT_CONFIG_124M, 'vocab_size': VOCAB, 'context_length': 16, 'emb_dim': 16, 'n_heads': 2,
           'n_layers': 2, 'drop_rate': 0.0, 'qkv_bias': False}
    return GPTModel(cfg).eval()


class FixedLogits(nn.Module):
    "A model (without a cache argument) whose every position predicts the same logits, in their dtype."
    def __init__(self, row):
        super().__init__()
        self.row = row
        self.cfg = {'vocab_size': row.shape[-1], 'context_length': 16}

    def forward(self, idx):
        return self.row.expand(idx.shape[0], idx.shape[1], -1)    # (b, T, vocab_size)


def old_next_token(logits, temperature, top_k, generator):
    "The formula `_next_token` used before the safe form: the reference for ordinary temperatures."
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return logits.argmax(dim=-1)


def spread_logits(dtype=torch.float32):
    "Logits 0, 2, 4, ...: far apart, so that only a (nearly) uniform distribution draws the small ones."
    return (2.0 * torch.arange(VOCAB, dtype=torch.float32)).to(dtype)


# --- one check, every entry point -----------------------------------------------------------------------------------

BAD_TEMPERATURES = [math.nan, math.inf, -math.inf, -1, -1e-9, '0.7', True, False, None, 1j, torch.tensor(1.0)]
BAD_TOP_K = [0, -1, -5, 2.5, 3.0, '3', True, False, math.nan]


@pytest.mark.parametrize('temperature', BAD_TEMPERATURES, ids=repr)
def test_check_sampling_rejects_bad_temperatures(temperature):
    with pytest.raises(ValueError, match='temperature') as e:
        kv_cache.check_sampling(temperature, None)
    message = str(e.value)
    assert '\n' not in message and repr(temperature) in message and 'finite' in message and '>= 0' in message


@pytest.mark.parametrize('top_k', BAD_TOP_K, ids=repr)
def test_check_sampling_rejects_bad_top_k(top_k):
    with pytest.raises(ValueError, match='top_k') as e:
        kv_cache.check_sampling(1.0, top_k)
    message = str(e.value)
    assert '\n' not in message and repr(top_k) in message and 'integer' in message


@pytest.mark.parametrize('temperature, top_k', [(0, None), (0.0, 1), (1, 5), (1e-45, None), (5e-324, 3),
                                                (sys.float_info.max, None), (np.float32(0.7), np.int64(4)),
                                                (np.float64(2.0), None)])
def test_check_sampling_accepts_finite_non_negative_temperatures(temperature, top_k):
    assert kv_cache.check_sampling(temperature, top_k) is None
    assert kv_cache.check_sampling(temperature, top_k, vocab_size=VOCAB) is None


def test_check_sampling_bounds_top_k_by_the_vocabulary():
    kv_cache.check_sampling(1.0, VOCAB, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=f'top_k must be between 1 and the vocabulary size {VOCAB}, not {VOCAB + 1}'):
        kv_cache.check_sampling(1.0, VOCAB + 1, vocab_size=VOCAB)


def test_check_sampling_is_exported():
    assert 'check_sampling' in kv_cache.__all__


ENTRY_POINTS = {'generate': generate, 'generate_stream': generate_stream, 'pretrain.generate': pretrain.generate}


@pytest.mark.parametrize('entry', ENTRY_POINTS)
@pytest.mark.parametrize('kwargs', [{'temperature': t} for t in BAD_TEMPERATURES] + [{'top_k': k} for k in BAD_TOP_K],
                         ids=repr)
def test_every_entry_point_rejects_bad_settings_at_the_call(entry, kwargs):
    model = tiny_gpt()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        ENTRY_POINTS[entry](model, torch.zeros(1, 3, dtype=torch.long), 4, **kwargs)
    assert not calls     # refused before the model runs (for the stream: before the first next())


# --- extreme temperatures that the check accepts ------------------------------------------------------------------

@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('top_k', [None, 1, 5])
@pytest.mark.parametrize('temperature', TINY_T + HUGE_T)
def test_extreme_temperatures_give_valid_tokens(temperature, top_k, dtype):
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)).mul(4).to(dtype)
    tokens = _next_token(logits, temperature, top_k, torch.Generator().manual_seed(1))
    assert tokens.shape == (6,) and tokens.dtype == torch.long
    assert ((tokens >= 0) & (tokens < VOCAB)).all()
    if top_k is not None:
        top = logits.float().topk(top_k, dim=-1).indices
        assert (top == tokens[:, None]).any(dim=1).all()


@pytest.mark.parametrize('top_k', [None, 4])
@pytest.mark.parametrize('temperature', TINY_T + HUGE_T)
def test_extreme_temperatures_generate_with_a_tiny_model(temperature, top_k):
    model = tiny_gpt(seed=3)
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    out = generate(model, idx, 10, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 14) and ((out >= 0) & (out < VOCAB)).all()
    streamed = list(generate_stream(model, idx[:1], 10, temperature=temperature, top_k=top_k))
    assert len(streamed) == 10 and all(0 <= t < VOCAB for t in streamed)
    out = pretrain.generate(model, idx, 10, 16, temperature=temperature, top_k=top_k)
    assert out.shape == (2, 14)


@pytest.mark.parametrize('top_k', [None, 7])
@pytest.mark.parametrize('temperature', TINY_T)
def test_tiny_temperature_is_greedy(temperature, top_k):
    model = tiny_gpt(seed=4)
    idx = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, idx, 20)
    sampled = generate(model, idx, 20, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('temperature', TINY_T)
def test_tiny_temperature_samples_among_tied_maxima(temperature, dtype):
    row = torch.tensor([1.0, 3.0, 3.0, 2.0, -1.0, 3.0]).to(dtype)
    tokens = _next_token(row.expand(400, -1), temperature, None, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 2, 5}          # every maximum drawn, nothing else


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('temperature', HUGE_T)
def test_huge_temperature_is_uniform_over_the_top_k(temperature, dtype):
    logits = spread_logits(dtype).expand(600, -1)      # (600, vocab_size): one row per draw
    tokens = _next_token(logits, temperature, 3, torch.Generator().manual_seed(0))
    top3 = {VOCAB - 1, VOCAB - 2, VOCAB - 3}
    assert set(tokens.tolist()) <= top3
    assert len(set(tokens.tolist())) > 1
    if temperature > 1e30:                             # not 7e4: the logits' gaps of 2 still count a little there
        counts = torch.bincount(tokens, minlength=VOCAB)[VOCAB - 3:]
        assert (counts > 120).all()                    # about 200 each


@pytest.mark.parametrize('temperature', HUGE_T[:3])
def test_huge_temperature_without_top_k_reaches_the_whole_vocabulary(temperature):
    model = FixedLogits(spread_logits())
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 15, temperature=temperature,
                   generator=torch.Generator().manual_seed(0))
    # at temperature 1 every token would be the last one (gaps of 2 between logits)
    assert len(set(out[0, 1:].tolist())) > 5


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_huge_temperature_with_top_k_through_generate(dtype):
    model = FixedLogits(spread_logits(dtype))
    seen = set()
    for temperature in [1e308, sys.float_info.max]:
        out = generate(model, torch.zeros(1, 1, dtype=torch.long), 15, temperature=temperature, top_k=2,
                       generator=torch.Generator().manual_seed(0))
        seen |= set(out[0, 1:].tolist())
    assert seen == {VOCAB - 1, VOCAB - 2}


def test_infinite_logits_are_the_maxima():
    "A model that overflows to +inf (float16) still gets a token: the infinite logits are the maxima."
    row = torch.tensor([0.0, math.inf, 1.0, math.inf], dtype=torch.float16)
    for temperature in [1.0, 1e-45, 1e308]:
        tokens = _next_token(row.expand(200, -1), temperature, None, torch.Generator().manual_seed(0))
        assert set(tokens.tolist()) == {1, 3}


# --- ordinary temperatures: the same tokens as before ---------------------------------------------------------------

@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('top_k', [None, 1, 5, 20])
@pytest.mark.parametrize('temperature', ORDINARY_T)
def test_ordinary_temperatures_draw_the_same_tokens_as_the_old_formula(temperature, top_k, dtype):
    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(2)).mul(3).to(dtype)
    for seed in range(3):
        new = _next_token(logits, temperature, top_k, torch.Generator().manual_seed(seed))
        old = old_next_token(logits, temperature, top_k, torch.Generator().manual_seed(seed))
        assert torch.equal(new, old)


@pytest.mark.parametrize('temperature, top_k', [(0.1, None), (1.0, 10), (1.4, 25), (10.0, None)])
def test_ordinary_generation_is_unchanged(temperature, top_k, monkeypatch):
    model = tiny_gpt(seed=5)
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    new = generate(model, idx, 25, temperature=temperature, top_k=top_k)
    monkeypatch.setattr(kv_cache, '_next_token', old_next_token)
    torch.manual_seed(123)
    old = generate(model, idx, 25, temperature=temperature, top_k=top_k)
    assert torch.equal(new, old)
