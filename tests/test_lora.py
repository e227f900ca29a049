"Appendix E against the book's own classes, hand-computed parameter counts, unmerged outputs; LoRA on other models; the fine-tuning engine."
import io
import math
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from llm_from_scratch.classify import (
    SPAM_LABELS,
    add_classification_head,
    classify_text,
    count_parameters,
    load_classifier,
    save_classifier,
)
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.llama import LLAMA32_CONFIG_1B, Llama3Model
from llm_from_scratch.lora import LinearWithLoRA, LoRALayer, finetune_classifier, merge_lora, replace_linear_with_lora
from llm_from_scratch.trainer import NeuralNetwork, save_checkpoint
from llm_from_scratch.weights import gpt2_config

TINY = {**GPT_CONFIG_124M, 'context_length': 64, 'emb_dim': 32, 'n_heads': 2, 'n_layers': 2, 'drop_rate': 0.0, 'qkv_bias': True}
TINY_LLAMA = {**LLAMA32_CONFIG_1B, 'vocab_size': 101, 'context_length': 64, 'emb_dim': 32, 'n_heads': 4, 'n_kv_groups': 2,
              'n_layers': 2, 'hidden_dim': 48, 'dtype': torch.float32}


# --- the book's code, copied as the reference -------------------------------------------------------------
class BookLoRALayer(torch.nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class BookLinearWithLoRA(torch.nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = BookLoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def book_replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, BookLinearWithLoRA(module, rank, alpha))
        else:
            book_replace_linear_with_lora(module, rank, alpha)


def randomize_lora(model, std=0.05, seed=0):
    "Trained-looking adapters: B random instead of zero."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALayer, BookLoRALayer)):
                m.B.copy_(torch.randn(m.B.shape, generator=g) * std)


def gpt_classifier(seed=0):
    torch.manual_seed(seed)
    return add_classification_head(GPTModel(TINY), trainable_blocks=None).eval()


# --- the layers ---------------------------------------------------------------------------------------------
def test_lora_layer_matches_the_book():
    torch.manual_seed(1)
    ours = LoRALayer(12, 7, rank=3, alpha=2.5)
    torch.manual_seed(1)
    book = BookLoRALayer(12, 7, rank=3, alpha=2.5)
    torch.testing.assert_close(ours.A, book.A)
    randomize_lora(ours)
    randomize_lora(book)
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(ours(x), book(x))
    torch.testing.assert_close(ours(x), 2.5 * torch.einsum('bti,ir,ro->bto', x, ours.A, ours.B))
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match='rank'):
            LoRALayer(4, 4, bad, 1)


def test_linear_with_lora_starts_as_the_linear_layer_and_follows_its_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=8)
    x = torch.randn(3, 6)
    torch.testing.assert_close(wrapped(x), linear(x))
    half = LinearWithLoRA(nn.Linear(6, 4).to(torch.bfloat16), rank=2, alpha=1)
    assert half.lora.A.dtype == half.lora.B.dtype == torch.bfloat16
    assert half(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_adapters_are_drawn_the_same_on_every_device():
    torch.manual_seed(3)
    a = LinearWithLoRA(nn.Linear(5, 5, device='meta'), 2, 1)
    assert a.lora.A.device.type == 'meta'
    torch.manual_seed(3)
    nn.Linear(5, 5, device='meta')
    b = LinearWithLoRA(nn.Linear(5, 5), 2, 1)
    torch.manual_seed(3)
    nn.Linear(5, 5, device='meta')
    nn.Linear(5, 5)
    ref = BookLoRALayer(5, 5, 2, 1)
    torch.testing.assert_close(b.lora.A, ref.A)


# --- replacing ------------------------------------------------------------------------------------------------
def test_replace_matches_the_book_on_gpt():
    ours, book = gpt_classifier(), gpt_classifier()
    torch.manual_seed(7)
    replace_linear_with_lora(ours, rank=4, alpha=8)
    torch.manual_seed(7)
    book_replace_linear_with_lora(book, rank=4, alpha=8)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in book.named_parameters()]
    for (n, p), (_, q) in zip(ours.named_parameters(), book.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)
    randomize_lora(ours)
    randomize_lora(book)
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx))


def test_replace_counts_the_books_numbers_on_gpt2_small():
    with torch.device('meta'):
        model = add_classification_head(GPTModel(gpt2_config('gpt2-124m')), trainable_blocks=None)
        assert count_parameters(model) == 124_441_346
        model.requires_grad_(False)
        replace_linear_with_lora(model, rank=16, alpha=16)
    d, h = 768, 3072
    expected = 12 * 16 * (4 * (d + d) + (d + h) + (h + d)) + 16 * (d + 2)  # by hand: every linear layer's r (in + out)
    assert count_parameters(model) == expected == 2_666_528


def test_replace_is_idempotent_and_keeps_outputs_at_init():
    model = gpt_classifier()
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        before = model(idx)
    replace_linear_with_lora(model, 2, 4)
    n = sum(isinstance(m, LinearWithLoRA) for m in model.modules())
    replace_linear_with_lora(model, 2, 4)
    assert n == sum(isinstance(m, LinearWithLoRA) for m in model.modules()) == 2 * 6 + 1
    assert not any(isinstance(m.linear, LinearWithLoRA) for m in model.modules() if isinstance(m, LinearWithLoRA))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before)


def test_replace_works_on_llama_and_sequential_models():
    torch.manual_seed(0)
    llama = Llama3Model(TINY_LLAMA).eval()
    llama.out_head.weight = llama.tok_emb.weight  # tied, as Llama 3.2
    n_linear = sum(isinstance(m, nn.Linear) for m in llama.modules())
    idx = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        before = llama(idx)
    replace_linear_with_lora(llama, rank=3, alpha=2)
    assert sum(isinstance(m, LinearWithLoRA) for m in llama.modules()) == n_linear
    att = llama.trf_blocks[0].att
    assert att.W_key.lora.B.shape == (3, att.W_key.linear.out_features) != att.W_query.lora.B.shape
    with torch.no_grad():
        torch.testing.assert_close(llama(idx), before)
        randomize_lora(llama)
        adapted = llama(idx)
        emb = llama.tok_emb.weight.clone()
        merge_lora(llama)
        torch.testing.assert_close(llama(idx), adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(llama.tok_emb.weight, emb)  # the tied embedding is not changed by merging the head
    torch.manual_seed(0)
    mlp = replace_linear_with_lora(NeuralNetwork(4, 3), 2, 1)
    assert [type(m) for m in mlp.layers] == [LinearWithLoRA, nn.ReLU, LinearWithLoRA, nn.ReLU, LinearWithLoRA]


def test_only_the_adapters_learn_when_the_base_is_frozen():
    model = gpt_classifier()
    model.requires_grad_(False)
    replace_linear_with_lora(model, 2, 2)
    model.train()
    logits = model(torch.randint(0, 50257, (2, 5)))[:, -1, :]
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        if '.lora.' in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert p.grad is None, name
    # at B = 0, only the B matrices get a gradient; A's gradient is zero
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith('lora.A'))
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith('lora.B'))


# --- merging --------------------------------------------------------------------------------------------------
def test_merge_gives_the_same_logits_and_a_plain_model(tmp_path):
    plain = gpt_classifier()
    adapted = replace_linear_with_lora(gpt_classifier(), rank=4, alpha=16)
    randomize_lora(adapted)
    idx = torch.randint(0, 50257, (3, 11))
    with torch.no_grad():
        expected = adapted(idx)
        merged = merge_lora(adapted)
        torch.testing.assert_close(merged(idx), expected, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, (LinearWithLoRA, LoRALayer)) for m in merged.modules())
    assert list(merged.state_dict()) == list(plain.state_dict())
    path = save_classifier(merged, tmp_path/'clf', max_length=20)
    loaded, tok, meta = load_classifier(path, device='cpu')
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), expected, atol=1e-5, rtol=1e-5)


def test_unmerged_models_are_not_saved_as_plain_ones(tmp_path):
    adapted = replace_linear_with_lora(gpt_classifier(), rank=2, alpha=2)
    with pytest.raises(ValueError, match='merge LoRA'):
        save_classifier(adapted, tmp_path/'clf')


# --- the engine -----------------------------------------------------------------------------------------------
@pytest.fixture
def own_data(tmp_path):
    spam = [f"WINNER!! Claim your £{100 * i} prize, txt WIN to 8{i}00{i}" for i in range(20)]
    ham = [f"Are we still meeting at {i % 12 + 1}? I'll bring the notes" for i in range(20)]
    tsv = tmp_path/'messages.tsv'
    tsv.write_text(''.join(f'spam\t{t}\n' for t in spam) + ''.join(f'ham\t{t}\n' for t in ham), encoding='utf-8')
    torch.manual_seed(0)
    save_checkpoint(tmp_path/'base', GPTModel({**TINY, 'context_length': 16}), {'step': 0}, {'model': {**TINY, 'context_length': 16}})
    return tsv, tmp_path/'base'


@pytest.mark.parametrize('lora_rank', [None, 3])
def test_finetune_classifier_saves_a_loadable_classifier(own_data, tmp_path, lora_rank):
    tsv, base = own_data
    out = io.StringIO()
    with redirect_stdout(out):
        path = finetune_classifier(base, data=tsv, lora_rank=lora_rank, epochs=2, lr=1e-3, device='cpu',
                                   trainable_blocks=None, out_dir=tmp_path/'clf')
    assert 'Test accuracy' in out.getvalue() and str(path) in out.getvalue()
    model, tok, meta = load_classifier(path, device='cpu')
    assert meta['max_length'] == 16  # the longest message is longer than the base's context: truncated to it
    assert meta['info']['lora_rank'] == lora_rank and meta['info']['data'] == str(tsv)
    assert path.name == f'step-{2 * 3:08d}'  # 28 training messages: 3 batches of 8 per epoch
    label, prob = classify_text(model, 'WINNER!! Claim your prize', tok, meta)
    assert label in SPAM_LABELS and 0.5 <= prob <= 1


def test_finetune_classifier_default_folder_and_refusals(own_data, tmp_path):
    tsv, base = own_data
    path = finetune_classifier(base, data=tsv, lora_rank=2, epochs=1, device='cpu', quiet=True)
    assert path.parent == tmp_path/'home'/'classifiers'/'base-messages-lora2'
    with pytest.raises(ValueError, match='lora_rank'):
        finetune_classifier(base, data=tsv, lora_rank=0)
    with pytest.raises(ValueError, match='last_token'):
        finetune_classifier(base, data=tsv, last_token='first')
    small = tmp_path/'small.tsv'
    small.write_text('spam\tWIN\nham\thi\nham\tok\n', encoding='utf-8')
    with pytest.raises(ValueError, match='too few'):
        finetune_classifier(base, data=small)
    bad = tmp_path/'bad.tsv'
    bad.write_text('spam\tWIN\nspma\thi\n', encoding='utf-8')
    with pytest.raises(ValueError, match='line 2'):
        finetune_classifier(base, data=bad)
