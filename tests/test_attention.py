"Chapter 3's attention modules against independent references: the wrapper, PyTorch's nn.MultiheadAttention, causality, bad inputs."
import pytest
import torch
from torch import nn

from llm_from_scratch.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
)

SHAPES = [(1, 1, 4, 4, 1), (2, 5, 6, 6, 3), (3, 16, 8, 12, 4), (2, 7, 5, 16, 2)]  # (b, T, d_in, d_out, num_heads)


def mha_from_wrapper(wrapper: MultiHeadAttentionWrapper, context_length: int) -> MultiHeadAttention:
    "A MultiHeadAttention computing what `wrapper` computes: its heads' projections side by side, out_proj the identity."
    heads = wrapper.heads
    d_in, head_dim = heads[0].W_query.in_features, heads[0].W_query.out_features
    d_out = head_dim * len(heads)
    bias = heads[0].W_query.bias is not None
    mha = MultiHeadAttention(d_in, d_out, context_length, 0.0, num_heads=len(heads), qkv_bias=bias)
    with torch.no_grad():
        for name in ('W_query', 'W_key', 'W_value'):
            getattr(mha, name).weight.copy_(torch.cat([getattr(h, name).weight for h in heads]))
            if bias:
                getattr(mha, name).bias.copy_(torch.cat([getattr(h, name).bias for h in heads]))
        mha.out_proj.weight.copy_(torch.eye(d_out))
        mha.out_proj.bias.zero_()
    return mha


@pytest.mark.parametrize('b,T,d_in,d_out,num_heads', SHAPES)
@pytest.mark.parametrize('qkv_bias', [False, True])
def test_mha_equals_wrapper(b, T, d_in, d_out, num_heads, qkv_bias):
    torch.manual_seed(0)
    head_dim = d_out // num_heads
    wrapper = MultiHeadAttentionWrapper(d_in, head_dim, T + 3, 0.0, num_heads, qkv_bias=qkv_bias)
    mha = mha_from_wrapper(wrapper, T + 3)
    x = torch.randn(b, T, d_in)
    torch.testing.assert_close(mha(x), wrapper(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('b,T,d,num_heads', [(1, 1, 4, 1), (2, 5, 6, 3), (3, 16, 12, 4), (2, 33, 64, 8)])
@pytest.mark.parametrize('attn_impl', ['book', 'sdpa'])
def test_mha_equals_torch_multihead_attention(b, T, d, num_heads, attn_impl):
    "PyTorch's module projects queries from inputs of size embed_dim, so self-attention there needs d_in == d_out."
    torch.manual_seed(1)
    ours = MultiHeadAttention(d, d, T, 0.0, num_heads, qkv_bias=True, attn_impl=attn_impl)
    ref = nn.MultiheadAttention(d, num_heads, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.W_query.weight, ours.W_key.weight, ours.W_value.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.W_query.bias, ours.W_key.bias, ours.W_value.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(b, T, d)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True: may not attend
    expected, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cls', ['causal', 'wrapper', 'mha', 'sdpa'])
def test_causal_output_ignores_the_future(cls):
    torch.manual_seed(2)
    T, d = 9, 8
    module = {'causal': lambda: CausalAttention(d, d, T, 0.0),
              'wrapper': lambda: MultiHeadAttentionWrapper(d, 4, T, 0.0, 2),
              'mha': lambda: MultiHeadAttention(d, d, T, 0.0, 4),
              'sdpa': lambda: MultiHeadAttention(d, d, T, 0.0, 4, attn_impl='sdpa')}[cls]()
    x = torch.randn(2, T, d)
    out = module(x)
    for t in range(T - 1):
        y = x.clone()
        y[:, t + 1:] = torch.randn(2, T - t - 1, d)  # change everything after t
        changed = module(y)
        torch.testing.assert_close(changed[:, :t + 1], out[:, :t + 1])
        assert not torch.allclose(changed[:, t + 1:], out[:, t + 1:])


def test_shorter_inputs_use_the_corner_of_the_mask():
    torch.manual_seed(3)
    long = MultiHeadAttention(6, 6, 32, 0.0, 2)
    short = MultiHeadAttention(6, 6, 5, 0.0, 2)
    short.load_state_dict({k: v for k, v in long.state_dict().items() if k != 'mask'}, strict=False)
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(long(x), short(x))


def test_d_out_not_divisible_by_num_heads():
    with pytest.raises(ValueError, match='d_out.*divisible by num_heads'):
        MultiHeadAttention(4, 10, 8, 0.0, num_heads=4)


def test_unknown_attn_impl():
    with pytest.raises(ValueError, match='attn_impl'):
        MultiHeadAttention(4, 8, 8, 0.0, num_heads=2, attn_impl='flash')


@pytest.mark.parametrize('make', [lambda: CausalAttention(4, 4, 8, 0.0),
                                  lambda: MultiHeadAttentionWrapper(4, 2, 8, 0.0, 2),
                                  lambda: MultiHeadAttention(4, 4, 8, 0.0, 2),
                                  lambda: MultiHeadAttention(4, 4, 8, 0.0, 2, attn_impl='sdpa')])
def test_input_longer_than_context_length(make):
    module = make()
    module(torch.randn(1, 8, 4))  # exactly context_length is fine
    with pytest.raises(ValueError, match='9 tokens, more than the context_length of 8'):
        module(torch.randn(1, 9, 4))


@pytest.mark.parametrize('attn_impl', ['book', 'sdpa'])
def test_mask_buffer_follows_to(attn_impl):
    torch.manual_seed(4)
    mha = MultiHeadAttention(6, 6, 10, 0.0, 3, attn_impl=attn_impl)
    x = torch.randn(2, 10, 6)
    expected = mha(x).double()
    mha64 = mha.to(torch.float64)
    assert mha64.mask.dtype == torch.float64 and mha64.W_query.weight.dtype == torch.float64
    out = mha64(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert 'mask' in dict(mha.named_buffers()) and 'mask' not in dict(mha.named_parameters())


@pytest.mark.gpu
def test_mask_buffer_follows_to_cuda():
    mha = MultiHeadAttention(6, 6, 10, 0.0, 3).to('cuda')
    assert mha.mask.device.type == 'cuda'
    assert mha(torch.randn(2, 10, 6, device='cuda')).device.type == 'cuda'


def test_sdpa_dropout_only_in_training():
    torch.manual_seed(5)
    mha = MultiHeadAttention(8, 8, 12, 0.5, 2, attn_impl='sdpa')
    x = torch.randn(2, 12, 8)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


def test_v1_and_v2_agree_with_shared_weights():
    torch.manual_seed(6)
    v2 = SelfAttention_v2(5, 3)
    v1 = SelfAttention_v1(5, 3)
    v1.W_query, v1.W_key, v1.W_value = (nn.Parameter(getattr(v2, n).weight.T) for n in ('W_query', 'W_key', 'W_value'))
    x = torch.randn(7, 5)
    torch.testing.assert_close(v1(x), v2(x))
