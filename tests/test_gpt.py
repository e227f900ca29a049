"Chapter 4's GPT against independent references: PyTorch's GELU and LayerNorm, the SDPA path, a cached forward, Hugging Face's GPT-2."
import pytest
import torch
from torch import nn

from llm_from_scratch.gpt import (
    GELU,
    GPT_CONFIG_124M,
    GPT_CONFIG_KEYS,
    GPTModel,
    LayerNorm,
    TransformerBlock,
    check_gpt_config,
    generate_text_simple,
)

TINY = {**GPT_CONFIG_124M, 'vocab_size': 97, 'context_length': 24, 'emb_dim': 32, 'n_heads': 4, 'n_layers': 2}


def test_gelu_matches_torch_tanh_approximation():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10_000) * 4, torch.linspace(-20, 20, 2001)])
    torch.testing.assert_close(GELU()(x), nn.GELU(approximate='tanh')(x), rtol=1e-5, atol=1e-6)
    x64 = x.double()
    torch.testing.assert_close(GELU()(x64), nn.GELU(approximate='tanh')(x64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('shape', [(5,), (3, 8), (2, 7, 64), (2, 3, 4, 768)])
def test_layernorm_matches_torch(shape):
    torch.manual_seed(1)
    d = shape[-1]
    ours, ref = LayerNorm(d), nn.LayerNorm(d, eps=1e-5)
    with torch.no_grad():
        ours.scale.copy_(torch.randn(d))
        ours.shift.copy_(torch.randn(d))
        ref.weight.copy_(ours.scale)
        ref.bias.copy_(ours.shift)
    x = torch.randn(shape) * 3 + 2
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('qkv_bias', [False, True])
@pytest.mark.parametrize('T', [1, 7, 24])
def test_sdpa_path_gives_the_book_logits(qkv_bias, T):
    torch.manual_seed(2)
    cfg = {**TINY, 'qkv_bias': qkv_bias}
    book = GPTModel(cfg).eval()
    sdpa = GPTModel({**cfg, 'attn_impl': 'sdpa'}).eval()
    sdpa.load_state_dict(book.state_dict())
    idx = torch.randint(0, cfg['vocab_size'], (3, T))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(idx), book(idx), rtol=1e-5, atol=1e-5)


def test_sdpa_path_gives_the_book_gradients():
    torch.manual_seed(3)
    cfg = {**TINY, 'drop_rate': 0.0}
    book, sdpa = GPTModel(cfg), GPTModel({**cfg, 'attn_impl': 'sdpa'})
    sdpa.load_state_dict(book.state_dict())
    idx = torch.randint(0, cfg['vocab_size'], (2, 11))
    for m in (book, sdpa):
        m(idx).logsumexp(-1).mean().backward()
    for (name, p), q in zip(book.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


class FakeLayerCache:
    "A test double of one layer's KV cache: grows by torch.cat, masks the future by absolute position."
    def __init__(self, owner):
        self.owner, self.k, self.v = owner, None, None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def mask(self, T):
        S = self.owner.offset + T
        q_pos = torch.arange(self.owner.offset, S)[:, None]  # (T, 1)
        return torch.arange(S)[None, :] > q_pos              # (T, S): True where the key is in the query's future


class FakeCache:
    "A test double of the cache protocol (the real one is chapter 4's bonus page): no pre-allocation, no padding."
    def __init__(self, n_layers, batched_positions=False, batch_size=1):
        self.offset, self.batched, self.b = 0, batched_positions, batch_size
        self.layers = [FakeLayerCache(self) for _ in range(n_layers)]
        self.advanced = []

    def positions(self, T):
        pos = torch.arange(self.offset, self.offset + T)
        return pos.expand(self.b, T) if self.batched else pos

    def advance(self, T):
        self.offset += T
        self.advanced.append(T)


@pytest.mark.parametrize('attn_impl', ['book', 'sdpa'])
@pytest.mark.parametrize('chunks', [[5, 1, 1, 1, 1, 1], [1] * 8, [3, 4, 2, 1], [24]])
def test_cached_forward_matches_uncached(attn_impl, chunks):
    torch.manual_seed(4)
    model = GPTModel({**TINY, 'attn_impl': attn_impl}).eval()
    idx = torch.randint(0, TINY['vocab_size'], (2, sum(chunks)))
    cache = FakeCache(TINY['n_layers'], batched_positions=len(chunks) % 2 == 0, batch_size=2)
    with torch.no_grad():
        full = model(idx)
        start = 0
        for T in chunks:
            logits = model(idx[:, start:start + T], cache=cache)
            torch.testing.assert_close(logits, full[:, start:start + T], rtol=1e-5, atol=1e-5)
            start += T
    assert cache.advanced == chunks and cache.offset == sum(chunks)
    assert all(layer.k.shape == (2, TINY['n_heads'], sum(chunks), TINY['emb_dim'] // TINY['n_heads']) for layer in cache.layers)


def test_block_passes_cache_to_attention():
    torch.manual_seed(5)
    block = TransformerBlock(TINY).eval()
    x = torch.randn(1, 6, TINY['emb_dim'])
    cache = FakeCache(1)
    with torch.no_grad():
        full = block(x)
        part1 = block(x[:, :4], cache=cache.layers[0])
        cache.advance(4)
        part2 = block(x[:, 4:], cache=cache.layers[0])
    torch.testing.assert_close(torch.cat([part1, part2], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('key', GPT_CONFIG_KEYS)
def test_missing_config_key(key):
    cfg = {k: v for k, v in TINY.items() if k != key}
    with pytest.raises(ValueError, match=repr(key)):
        GPTModel(cfg)


@pytest.mark.parametrize('change,key', [({'emb_dim': 30}, 'emb_dim'), ({'n_heads': 0}, 'n_heads'), ({'n_layers': -1}, 'n_layers'),
                                        ({'vocab_size': 9.5}, 'vocab_size'), ({'drop_rate': 1.0}, 'drop_rate'),
                                        ({'attn_impl': 'flash'}, 'attn_impl')])
def test_invalid_config_value(change, key):
    with pytest.raises(ValueError, match=key):
        GPTModel({**TINY, **change})
    with pytest.raises(ValueError, match=key):
        check_gpt_config({**TINY, **change})


def test_config_is_not_mutated_and_is_exposed():
    cfg = dict(TINY)
    model = GPTModel(cfg)
    assert cfg == TINY and model.cfg == TINY and model.cfg is not cfg


def test_input_longer_than_context_length():
    model = GPTModel(TINY).eval()
    model(torch.zeros(1, 24, dtype=torch.long))
    with pytest.raises(ValueError, match="25 tokens, more than the model's context_length of 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


class RecordingModel(nn.Module):
    "Logits that favour (last token + 1) mod vocab at every position; records the lengths it was called with."
    def __init__(self, vocab=11):
        super().__init__()
        self.vocab, self.lengths = vocab, []

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        return nn.functional.one_hot((idx + 1) % self.vocab, self.vocab).float()


def test_generate_text_simple_crops_to_context_size():
    model = RecordingModel()
    out = generate_text_simple(model, torch.tensor([[3, 4, 5], [0, 1, 2]]), max_new_tokens=10, context_size=4)
    assert model.lengths == [3] + [4] * 9
    assert out.tolist() == [[(3 + i) % 11 for i in range(13)], [i % 11 for i in range(13)]]


def test_generate_text_simple_past_the_models_context():
    torch.manual_seed(6)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, TINY['vocab_size'], (2, 20))
    out = generate_text_simple(model, idx, max_new_tokens=10, context_size=TINY['context_length'])
    assert out.shape == (2, 30) and torch.equal(out[:, :20], idx)
    with torch.no_grad():  # the last token is the argmax of the logits on the 24 tokens before it
        torch.testing.assert_close(out[:, -1], model(out[:, -25:-1])[:, -1].argmax(-1))


def test_state_dict_names_are_the_books():
    keys = list(GPTModel({**TINY, 'n_layers': 1}).state_dict())
    assert keys == ['tok_emb.weight', 'pos_emb.weight',
                    'trf_blocks.0.att.mask', 'trf_blocks.0.att.W_query.weight', 'trf_blocks.0.att.W_key.weight',
                    'trf_blocks.0.att.W_value.weight', 'trf_blocks.0.att.out_proj.weight', 'trf_blocks.0.att.out_proj.bias',
                    'trf_blocks.0.ff.layers.0.weight', 'trf_blocks.0.ff.layers.0.bias', 'trf_blocks.0.ff.layers.2.weight',
                    'trf_blocks.0.ff.layers.2.bias', 'trf_blocks.0.norm1.scale', 'trf_blocks.0.norm1.shift',
                    'trf_blocks.0.norm2.scale', 'trf_blocks.0.norm2.shift', 'final_norm.scale', 'final_norm.shift', 'out_head.weight']


@pytest.mark.parametrize('attn_impl', ['book', 'sdpa'])
def test_matches_hugging_face_gpt2(attn_impl):
    "A tiny random GPT-2 from transformers, its weights copied into GPTModel, gives the same logits."
    transformers = pytest.importorskip('transformers')
    cfg = {**TINY, 'qkv_bias': True, 'attn_impl': attn_impl}
    hf_cfg = transformers.GPT2Config(vocab_size=cfg['vocab_size'], n_positions=cfg['context_length'], n_embd=cfg['emb_dim'],
                                     n_layer=cfg['n_layers'], n_head=cfg['n_heads'], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     layer_norm_epsilon=1e-5, activation_function='gelu_new')
    torch.manual_seed(7)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPTModel(cfg).eval()
    sd = hf.state_dict()
    d = cfg['emb_dim']
    with torch.no_grad():
        ours.tok_emb.weight.copy_(sd['transformer.wte.weight'])
        ours.pos_emb.weight.copy_(sd['transformer.wpe.weight'])
        for i, b in enumerate(ours.trf_blocks):
            p = f'transformer.h.{i}.'
            w, bias = sd[p + 'attn.c_attn.weight'], sd[p + 'attn.c_attn.bias']  # Conv1D: (d, 3d)
            for j, lin in enumerate((b.att.W_query, b.att.W_key, b.att.W_value)):
                lin.weight.copy_(w[:, j * d:(j + 1) * d].T)
                lin.bias.copy_(bias[j * d:(j + 1) * d])
            b.att.out_proj.weight.copy_(sd[p + 'attn.c_proj.weight'].T)
            b.att.out_proj.bias.copy_(sd[p + 'attn.c_proj.bias'])
            b.ff.layers[0].weight.copy_(sd[p + 'mlp.c_fc.weight'].T)
            b.ff.layers[0].bias.copy_(sd[p + 'mlp.c_fc.bias'])
            b.ff.layers[2].weight.copy_(sd[p + 'mlp.c_proj.weight'].T)
            b.ff.layers[2].bias.copy_(sd[p + 'mlp.c_proj.bias'])
            b.norm1.scale.copy_(sd[p + 'ln_1.weight'])
            b.norm1.shift.copy_(sd[p + 'ln_1.bias'])
            b.norm2.scale.copy_(sd[p + 'ln_2.weight'])
            b.norm2.shift.copy_(sd[p + 'ln_2.bias'])
        ours.final_norm.scale.copy_(sd['transformer.ln_f.weight'])
        ours.final_norm.shift.copy_(sd['transformer.ln_f.bias'])
        ours.out_head.weight.copy_(sd['lm_head.weight'])
        idx = torch.randint(0, cfg['vocab_size'], (2, cfg['context_length']))
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sdpa_path_on_cuda(dtype):
    torch.manual_seed(8)
    cfg = {**GPT_CONFIG_124M, 'n_layers': 2}
    book = GPTModel(cfg).to('cuda', dtype).eval()
    sdpa = GPTModel({**cfg, 'attn_impl': 'sdpa'}).to('cuda', dtype).eval()
    sdpa.load_state_dict(book.state_dict())
    idx = torch.randint(0, cfg['vocab_size'], (2, 512), device='cuda')
    with torch.no_grad():
        tol = 1e-3 if dtype == torch.float32 else 1e-1
        torch.testing.assert_close(sdpa(idx).float(), book(idx).float(), rtol=tol, atol=tol)
