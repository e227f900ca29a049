"Every attention variant of chapter 3's bonus page computes the chapter's `MultiHeadAttention`, given its weights."
import warnings

import pytest
import torch

from llm_from_scratch.attention import MultiHeadAttention
from llm_from_scratch.attention_variants import (
    MultiHeadAttentionCombinedQKV,
    MultiHeadAttentionEinsum,
    MultiHeadAttentionFlex,
    MultiHeadAttentionPyTorch,
    MultiHeadAttentionSDPA,
    MultiHeadAttentionStacked,
    flex_attention,
)

CONTEXT = 16
VARIANTS = {
    'stacked': MultiHeadAttentionStacked,
    'combined': MultiHeadAttentionCombinedQKV,
    'einsum': MultiHeadAttentionEinsum,
    'sdpa': MultiHeadAttentionSDPA,
    'sdpa-flash': lambda *a, **kw: MultiHeadAttentionSDPA(*a, **kw, flash=True),
    'sdpa-noflash': lambda *a, **kw: MultiHeadAttentionSDPA(*a, **kw, flash=False),
    'pytorch': MultiHeadAttentionPyTorch,
    'flex': MultiHeadAttentionFlex,
}
CACHED = ['combined', 'einsum', 'sdpa', 'sdpa-flash', 'sdpa-noflash']  # the variants that accept a KV cache
# (b, T, d_in, d_out, num_heads, qkv_bias)
SHAPES = [(1, 1, 8, 8, 2, False), (2, 5, 6, 8, 2, True), (3, 16, 8, 8, 4, True), (2, 11, 12, 16, 4, False),
          (1, 9, 16, 8, 1, True), (4, 7, 24, 24, 8, False)]
no_flex = pytest.mark.skipif(flex_attention is None, reason='FlexAttention needs torch >= 2.5')


def make(name, d_in, d_out, num_heads, qkv_bias, dropout=0.0, seed=0):
    "A chapter-3 module with random weights and the variant `name` holding the same weights."
    torch.manual_seed(seed)
    ref = MultiHeadAttention(d_in, d_out, CONTEXT, dropout, num_heads, qkv_bias=qkv_bias)
    if qkv_bias:  # nn.Linear's biases start random already; make them large enough to matter
        with torch.no_grad():
            for lin in (ref.W_query, ref.W_key, ref.W_value):
                lin.bias.normal_()
    return ref, VARIANTS[name](d_in, d_out, CONTEXT, dropout, num_heads, qkv_bias=qkv_bias).load_weights_from(ref)


def cases(names):
    "(variant, shape) pairs, leaving out the shapes a variant cannot take (nn.MultiheadAttention needs d_in == d_out)."
    return [pytest.param(n, s, id=f'{n}-{"-".join(map(str, s))}') for n in names for s in SHAPES
            if not (n == 'pytorch' and s[2] != s[3]) and not (n == 'flex' and flex_attention is None)]


@pytest.mark.parametrize('name,shape', cases(VARIANTS))
def test_forward_matches_chapter(name, shape):
    b, T, d_in, d_out, h, bias = shape
    ref, var = make(name, d_in, d_out, h, bias)
    x = torch.randn(b, T, d_in)
    with torch.no_grad():  # eval() and no_grad: nn.MultiheadAttention's fused fast path, FlexAttention's CPU forward
        want = ref.eval()(x)
        torch.testing.assert_close(var.eval()(x), want, atol=1e-5, rtol=1e-5)
    if name != 'flex':  # training mode (dropout 0) with autograd on: nn.MultiheadAttention's ordinary path
        torch.testing.assert_close(var.train()(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name,shape', cases([n for n in VARIANTS if n != 'flex']))
def test_gradients_match_chapter(name, shape):
    b, T, d_in, d_out, h, bias = shape
    ref, var = make(name, d_in, d_out, h, bias)
    x = torch.randn(b, T, d_in)
    upstream = torch.randn(b, T, d_out)
    grads = []
    for m in (ref, var):
        xi = x.clone().requires_grad_()
        (m(xi) * upstream).sum().backward()
        out_proj = m.mha.out_proj if m is var and name == 'pytorch' else m.out_proj
        grads.append((xi.grad, out_proj.weight.grad, out_proj.bias.grad))
    for g_ref, g_var in zip(*grads):
        torch.testing.assert_close(g_var, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_causal(name):
    "Independent of the reference: changing future tokens never changes earlier outputs."
    _, var = make(name, 8, 8, 2, True)
    torch.manual_seed(1)
    x = torch.randn(2, 10, 8)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 8)
    with torch.no_grad():
        y, y2 = var.eval()(x), var(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert (y[:, 6:] - y2[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize('name', [n for n in VARIANTS if n != 'flex'])
def test_dropout_acts_in_training_only(name):
    ref, var = make(name, 8, 8, 2, False, dropout=0.5)
    x = torch.randn(2, 12, 8)
    with torch.no_grad():
        torch.testing.assert_close(var.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)
    var.train()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # flash=True on the CPU: no dropout in the flash kernel, so it falls back
        y1, y2 = var(x), var(x)
    assert (y1 - y2).abs().max() > 1e-3  # different dropout masks
    assert torch.isfinite(y1).all()


@no_flex
def test_flex_refuses_training_dropout():
    _, var = make('flex', 8, 8, 2, False, dropout=0.1)
    with pytest.raises(ValueError, match='no attention dropout'):
        var.train()(torch.randn(1, 4, 8))
    with torch.no_grad():
        assert var.eval()(torch.randn(1, 4, 8)).shape == (1, 4, 8)


@no_flex
def test_flex_backward_on_cpu():
    "FlexAttention has no CPU backward in torch 2.13: it says so. Should a later torch add one, it must be right."
    ref, var = make('flex', 8, 8, 2, True)
    x = torch.randn(2, 6, 8, requires_grad=True)
    try:
        y = var(x)
    except NotImplementedError as e:
        assert 'backward on CPU' in str(e)
        return
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref(x).sum().backward()
    torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@no_flex
def test_flex_compiled_matches_chapter():
    "The fused kernel torch.compile generates from the mask function, on the CPU (inference); compiling takes 10-30 s."
    for b, T, d_in, d_out, h, bias in [(2, 16, 8, 8, 2, True), (1, 13, 6, 8, 2, False)]:
        torch.manual_seed(0)
        ref = MultiHeadAttention(d_in, d_out, CONTEXT, 0.0, h, qkv_bias=bias).eval()
        var = MultiHeadAttentionFlex(d_in, d_out, CONTEXT, 0.0, h, qkv_bias=bias, compiled=True).load_weights_from(ref).eval()
        x = torch.randn(b, T, d_in)
        with torch.no_grad():
            torch.testing.assert_close(var(x), ref(x), atol=1e-5, rtol=1e-5)


def test_sdpa_flash_falls_back_with_a_warning():
    "The CPU flash kernel has no dropout: flash=True warns once, records it, and PyTorch picks a kernel."
    ref, var = make('sdpa-flash', 8, 8, 2, False, dropout=0.5)
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        var.train()(x)
        var(x)
    ours = [w for w in caught if 'PyTorch picks the kernel' in str(w.message)]
    if not var.fell_back:
        pytest.skip('this torch has a CPU flash kernel with dropout: nothing to fall back from')
    assert len(ours) == 1  # once per module, not per call
    with torch.no_grad():
        torch.testing.assert_close(var.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)
    assert not var.fell_back  # in eval the flash kernel runs again


class ConcatCache:
    "A minimal layer cache following the package's protocol, by concatenation (a reference, not the fast one)."
    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def mask(self, T):
        S = self.k.shape[2]
        i = torch.arange(S - T, S)[:, None]  # absolute positions of the new queries
        return torch.arange(S)[None, :] > i  # (T, S), True for keys in a query's future


@pytest.mark.parametrize('name', CACHED)
def test_kv_cache_matches_full_forward(name):
    "Feeding tokens in chunks through a cache gives the chapter's output on the whole sequence."
    ref, var = make(name, 12, 16, 4, True)
    x = torch.randn(2, 10, 12)
    with torch.no_grad():
        want = ref.eval()(x)
        cache, outs, start = ConcatCache(), [], 0
        for n in (4, 1, 1, 3, 1):
            outs.append(var.eval()(x[:, start:start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', ['combined', 'einsum', 'sdpa'])
def test_swap_into_gpt_model(name):
    "A variant loaded from a block's attention replaces it in chapter 4's GPTModel: the logits do not change."
    gpt = pytest.importorskip('llm_from_scratch.gpt')
    cfg = {**gpt.GPT_CONFIG_124M, 'vocab_size': 50, 'context_length': 12, 'emb_dim': 16, 'n_heads': 4, 'n_layers': 2,
           'drop_rate': 0.0, 'qkv_bias': True}
    torch.manual_seed(0)
    model = gpt.GPTModel(cfg).eval()
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        want = model(idx)
        for block in model.trf_blocks:
            old = block.att
            block.att = VARIANTS[name](16, 16, 12, 0.0, 4, qkv_bias=True).load_weights_from(old).eval()
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', [n for n in VARIANTS if n not in CACHED and not (n == 'flex' and flex_attention is None)])
def test_no_cache_support_says_so(name):
    _, var = make(name, 8, 8, 2, False)
    with pytest.raises(ValueError, match='KV cache'):
        var(torch.randn(1, 3, 8), cache=ConcatCache())


@pytest.mark.parametrize('name', [n for n in VARIANTS if not (n == 'flex' and flex_attention is None)])
def test_bad_inputs(name):
    with pytest.raises(ValueError, match='divisible by num_heads'):
        VARIANTS[name](8, 10, CONTEXT, 0.0, 4)
    _, var = make(name, 8, 8, 2, False)
    with pytest.raises(ValueError, match='context_length'):
        with torch.no_grad():
            var(torch.randn(1, CONTEXT + 1, 8))
    other = MultiHeadAttention(8, 8, CONTEXT, 0.0, 4)  # 4 heads, not 2
    with pytest.raises(ValueError, match='cannot copy weights'):
        var.load_weights_from(other)
    biased = MultiHeadAttention(8, 8, CONTEXT, 0.0, 2, qkv_bias=True)
    with pytest.raises(ValueError, match='cannot copy weights'):
        var.load_weights_from(biased)


def test_pytorch_needs_square_projection():
    with pytest.raises(ValueError, match='d_in \\(6\\) must equal d_out \\(8\\)'):
        MultiHeadAttentionPyTorch(6, 8, CONTEXT, 0.0, 2)


def test_mask_buffers_are_not_saved():
    "The causal mask follows from context_length: the variants' state dicts hold parameters only."
    for name in ('combined', 'sdpa', 'pytorch'):
        _, var = make(name, 8, 8, 2, False)
        assert not any('mask' in k for k in var.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_sdpa_flash_on_cuda():
    "In bf16 the CUDA flash kernel runs (no fallback) and agrees with the chapter's fp32 result to bf16 precision."
    ref, var = make('sdpa-flash', 64, 64, 4, True)
    ref, var = ref.cuda().eval(), var.cuda().eval()
    x = torch.randn(2, 16, 64, device='cuda')
    with torch.no_grad():
        want = ref(x)
        got = var.to(torch.bfloat16)(x.bfloat16()).float()
    assert not var.fell_back
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flex_attention is None, reason='needs CUDA and torch >= 2.5')
def test_flex_compiled_training_on_cuda():
    ref, var = make('flex', 64, 64, 4, True)
    ref, var = ref.cuda(), var.cuda()
    var.compiled = True
    x = torch.randn(2, 16, 64, device='cuda')
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((ref, var), xs)]
    for y in ys:
        y.sum().backward()
    torch.testing.assert_close(ys[1], ys[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-4, rtol=1e-4)
