"Chapter 5 and appendix D against independent references: the book's own loops, PyTorch's cross-entropy, the schedule's formula."
import math

import pytest
import tiktoken
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from llm_from_scratch import generation as kv_cache
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel, generate_text_simple
from llm_from_scratch.pretrain import (
    calc_loss_batch,
    calc_loss_loader,
    calc_lr,
    evaluate_model,
    find_highest_gradient,
    generate,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
    train_model,
    train_model_simple,
)
from llm_from_scratch.text import GPTDatasetV1

VOCAB = 128
TINY = {**GPT_CONFIG_124M, 'vocab_size': VOCAB, 'context_length': 16, 'emb_dim': 32, 'n_heads': 2, 'n_layers': 2}
TEXT = 'Every effort moves you forward, inch by inch, toward the end of the story. ' * 12


class CharTokenizer:
    "A tiktoken-like tokenizer over ASCII: one token per character."
    def encode(self, text, allowed_special=None):
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids):
        return ''.join(chr(i) for i in ids)


TOK = CharTokenizer()


def loaders(batch_size=2, max_length=16, drop_last=True):
    "Training and validation loaders over TEXT (90/10 split), the book's way."
    split = int(0.9 * len(TEXT))
    train = DataLoader(GPTDatasetV1(TEXT[:split], TOK, max_length, max_length), batch_size=batch_size, shuffle=True, drop_last=drop_last)
    val = DataLoader(GPTDatasetV1(TEXT[split:], TOK, max_length, max_length), batch_size=batch_size, shuffle=False, drop_last=False)
    return train, val


# --- the book's code, copied as the reference -------------------------------------------------------------
def book_calc_loss_loader(data_loader, model, device, num_batches=None):
    total_loss = 0.
    if len(data_loader) == 0:
        return float('nan')
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            logits = model(input_batch.to(device))
            total_loss += F.cross_entropy(logits.flatten(0, 1), target_batch.to(device).flatten()).item()
        else:
            break
    return total_loss / num_batches


def book_train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter):
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            logits = model(input_batch.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1), target_batch.to(device).flatten())
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    train_loss = book_calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
                    val_loss = book_calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
                model.train()
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
        model.eval()  # the book's sample: greedy, no random numbers drawn
        with torch.no_grad():
            generate_text_simple(model, torch.tensor([TOK.encode('Every')]), 8, model.pos_emb.weight.shape[0])
        model.train()
    return train_losses, val_losses, track_tokens_seen


def book_generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            min_val = top_logits[:, -1]
            logits = torch.where(logits < min_val, torch.tensor(float('-inf')).to(logits.device), logits)
        if temperature > 0.0:
            logits = logits / temperature
            probs = torch.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTModel({**TINY, **overrides})


# --- text helpers ----------------------------------------------------------------------------------------
def test_text_token_roundtrip_with_gpt2_tokenizer():
    tok = tiktoken.get_encoding('gpt2')
    text = 'Every effort moves you<|endoftext|> and more'
    idx = text_to_token_ids(text, tok)
    assert idx.shape == (1, len(tok.encode(text, allowed_special={'<|endoftext|>'})))
    assert token_ids_to_text(idx, tok) == text
    assert token_ids_to_text(idx[0], tok) == text
    assert token_ids_to_text(torch.tensor([6109]), tok) == 'Every'      # a single token, (1,)
    assert token_ids_to_text(torch.tensor([[6109]]), tok) == 'Every'    # and (1, 1)
    with pytest.raises(ValueError, match='one sequence'):
        token_ids_to_text(torch.zeros(2, 3, dtype=torch.long), tok)


# --- losses ----------------------------------------------------------------------------------------------
def test_calc_loss_batch_equals_log_softmax_reference():
    model = tiny_model().eval()
    torch.manual_seed(1)
    x, y = torch.randint(0, VOCAB, (3, 11)), torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        logp = torch.log_softmax(model(x).double(), dim=-1)                   # (3, 11, V)
        ref = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean()             # mean over all 33 positions
        ours = calc_loss_batch(x, y, model, 'cpu')
    assert ours.shape == ()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_calc_loss_loader_averages_the_first_batches():
    model = tiny_model().eval()
    train, _ = loaders()
    fixed = DataLoader(train.dataset, batch_size=2, shuffle=False)  # a fixed order, to compare batch by batch
    with torch.no_grad():
        per_batch = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in fixed]
        assert calc_loss_loader(fixed, model, 'cpu') == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-6)
        assert calc_loss_loader(fixed, model, 'cpu', num_batches=2) == pytest.approx(sum(per_batch[:2]) / 2, rel=1e-6)
        assert calc_loss_loader(fixed, model, 'cpu', num_batches=len(fixed)) == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-6)


def test_calc_loss_loader_empty_loader_is_an_error_not_nan():
    model = tiny_model().eval()
    _, val = loaders()
    empty = DataLoader(val.dataset, batch_size=len(val.dataset) + 1, drop_last=True)
    assert len(empty) == 0
    assert math.isnan(book_calc_loss_loader(empty, model, 'cpu'))  # what the book would report
    with pytest.raises(ValueError, match='no batches'):
        calc_loss_loader(empty, model, 'cpu')


@pytest.mark.parametrize('num_batches, message', [(99, r'num_batches=99, but the data loader has only \d+ batches'),
                                                  (0, 'positive integer'), (-2, 'positive integer'), (1.5, 'positive integer')])
def test_calc_loss_loader_bad_num_batches(num_batches, message):
    model = tiny_model().eval()
    train, _ = loaders()
    with pytest.raises(ValueError, match=message):
        calc_loss_loader(train, model, 'cpu', num_batches=num_batches)


def test_evaluate_model_uses_at_most_the_batches_a_loader_has_and_restores_training_mode():
    model = tiny_model()
    train, val = loaders()
    assert len(val) < 5
    torch.manual_seed(4)
    train_loss, val_loss = evaluate_model(model, train, val, 'cpu', eval_iter=5)
    assert model.training
    torch.manual_seed(4)
    model.eval()
    with torch.no_grad():
        assert train_loss == book_calc_loss_loader(train, model, 'cpu', 5)
        assert val_loss == book_calc_loss_loader(val, model, 'cpu', 5)
    with pytest.raises(ValueError, match='eval_iter'):
        evaluate_model(model, train, val, 'cpu', eval_iter=0)


# --- training --------------------------------------------------------------------------------------------
def test_train_model_simple_is_the_books_loop(capsys):
    "Same seeds, same batches, same dropout masks: our loop and the book's give identical losses."
    train, val = loaders()
    results = []
    for loop in ('ours', 'book'):
        torch.manual_seed(123)
        model = GPTModel(TINY)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        if loop == 'ours':
            results.append(train_model_simple(model, train, val, optimizer, 'cpu', num_epochs=2, eval_freq=3, eval_iter=2,
                                              start_context='Every', tokenizer=TOK))
        else:
            results.append(book_train_model_simple(model, train, val, optimizer, 'cpu', num_epochs=2, eval_freq=3, eval_iter=2))
    assert results[0] == results[1]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('Ep 1 (Step 000000): Train loss ')
    assert sum(line.startswith('Every') for line in out) == 2   # one sample per epoch


def test_train_model_simple_reduces_the_loss():
    train, val = loaders()
    torch.manual_seed(5)
    model = GPTModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    train_losses, val_losses, _ = train_model_simple(model, train, val, optimizer, 'cpu', num_epochs=4, eval_freq=5, eval_iter=3,
                                                     start_context='Every', tokenizer=TOK)
    assert train_losses[-1] < 0.6 * train_losses[0], train_losses
    assert val_losses[-1] < 0.6 * val_losses[0], val_losses


def test_tokens_seen_counts_every_token_of_every_batch():
    "With drop_last=False the last batch is smaller; tokens seen must follow the real batch sizes."
    train, val = loaders(batch_size=3, drop_last=False)
    n_windows = len(train.dataset)
    batch_tokens = [min(3, n_windows - 3 * i) * 16 for i in range(len(train))]   # per batch, in order
    assert batch_tokens[-1] < 3 * 16, n_windows                                    # the last batch is short
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, _, tokens_seen = train_model_simple(model, train, val, optimizer, 'cpu', num_epochs=2, eval_freq=2, eval_iter=1,
                                           start_context='E', tokenizer=TOK)
    cumulative = torch.tensor(batch_tokens * 2).cumsum(0).tolist()
    assert tokens_seen == cumulative[::2]


def test_train_model_simple_bad_settings():
    train, val = loaders()
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    empty = DataLoader(val.dataset, batch_size=len(val.dataset) + 1, drop_last=True)
    with pytest.raises(ValueError, match='eval_freq'):
        train_model_simple(model, train, val, optimizer, 'cpu', 1, 0, 1, 'E', TOK)
    with pytest.raises(ValueError, match='num_epochs'):
        train_model_simple(model, train, val, optimizer, 'cpu', -1, 1, 1, 'E', TOK)
    with pytest.raises(ValueError, match='no batches'):
        train_model_simple(model, empty, val, optimizer, 'cpu', 1, 1, 1, 'E', TOK)
    with pytest.raises(ValueError, match='no batches'):   # an empty validation loader fails at the first evaluation
        train_model_simple(model, train, empty, optimizer, 'cpu', 1, 1, 1, 'E', TOK)


def test_plot_losses_draws_two_x_axes():
    import matplotlib
    matplotlib.use('Agg')
    fig = plot_losses(torch.linspace(0, 2, 3), [10, 20, 30], [3., 2., 1.], [3.5, 2.5, 2.])
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == 'Epochs' and ax2.get_xlabel() == 'Tokens seen' and ax1.get_ylabel() == 'Loss'
    assert [line.get_label() for line in ax1.get_lines()] == ['Training loss', 'Validation loss']


# --- appendix D ------------------------------------------------------------------------------------------
def test_calc_lr_schedule_values():
    total, warmup, peak, init, low = 135, 27, 0.01, 1e-4, 1e-5
    lrs = [calc_lr(s, total, warmup, peak, init, low) for s in range(total + 1)]
    assert lrs[0] == init                                                   # step 0: initial_lr
    assert lrs[warmup] == pytest.approx(peak, abs=1e-15)                     # end of warmup: peak
    assert lrs[total] == pytest.approx(low, abs=1e-15)                       # end: min_lr
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))      # rising during warmup
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))        # falling after it
    for s in (0, 5, 26):                                                     # linear: the book's increment
        assert lrs[s] == init + s * ((peak - init) / warmup)
    for s in (27, 60, 134):                                                  # half a cosine period
        p = (s - warmup) / (total - warmup)
        assert lrs[s] == pytest.approx(low + (peak - low) * (1 + math.cos(math.pi * p)) / 2, rel=1e-12)
    assert calc_lr(0, 10, 0, peak, init, low) == peak                        # no warmup: start at the peak


@pytest.mark.parametrize('step, warmup, message', [(0, 10, 'warmup_steps'), (0, -1, 'warmup_steps'), (11, 3, 'step'), (-1, 3, 'step')])
def test_calc_lr_bad_arguments(step, warmup, message):
    with pytest.raises(ValueError, match=message):
        calc_lr(step, 10, warmup, 1e-3)


def test_find_highest_gradient():
    model = tiny_model()
    assert find_highest_gradient(model) is None
    x = torch.randint(0, VOCAB, (2, 8))
    calc_loss_batch(x, x, model, 'cpu').backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).max()
    assert find_highest_gradient(model) == ref


def record_clipping(monkeypatch, optimizer):
    "Record, for every call of clip_grad_norm_, the optimizer step it happened in and the norm before clipping."
    steps = {'done': 0}
    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    step = optimizer.step

    def counting_step(*args, **kwargs):
        out = step(*args, **kwargs)
        steps['done'] += 1
        return out

    def recording_clip(parameters, max_norm, *args, **kwargs):
        norm = clip(parameters, max_norm, *args, **kwargs)
        calls.append((steps['done'], float(norm), max_norm))
        return norm

    monkeypatch.setattr(optimizer, 'step', counting_step)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', recording_clip)
    return calls


def run_train_model(monkeypatch, orig_book_version, n_epochs=2, warmup_steps=3, lr=1e-2):
    train, val = loaders()
    torch.manual_seed(7)
    model = GPTModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    calls = record_clipping(monkeypatch, optimizer)
    out = train_model(model, train, val, optimizer, 'cpu', n_epochs=n_epochs, eval_freq=4, eval_iter=2, start_context='E',
                      tokenizer=TOK, warmup_steps=warmup_steps, initial_lr=1e-4, min_lr=1e-5, orig_book_version=orig_book_version)
    return model, train, out, calls


def test_train_model_follows_the_schedule_and_reduces_the_loss(monkeypatch):
    model, train, (train_losses, val_losses, tokens_seen, lrs), _ = run_train_model(monkeypatch, False, n_epochs=4)
    total = 4 * len(train)
    assert lrs == [calc_lr(s, total, 3, 1e-2, 1e-4, 1e-5) for s in range(total)]
    assert train_losses[-1] < 0.6 * train_losses[0], train_losses
    assert tokens_seen[0] == 2 * 16


def test_gradient_clipping_respects_max_norm(monkeypatch):
    model, train, _, calls = run_train_model(monkeypatch, False)
    assert all(max_norm == 1.0 for _, _, max_norm in calls)
    assert max(norm for _, norm, _ in calls) > 1.0, 'the test needs gradients that clipping actually shrinks'
    # the last step was clipped, and its gradients are still in .grad: their total norm is at most 1
    total_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert total_norm <= 1.0 + 1e-5


def test_orig_book_version_starts_clipping_one_step_later(monkeypatch):
    warmup = 3
    _, train, _, fixed = run_train_model(monkeypatch, False, warmup_steps=warmup)
    monkeypatch.undo()
    _, _, _, book = run_train_model(monkeypatch, True, warmup_steps=warmup)
    total = 2 * len(train)
    assert [step for step, _, _ in fixed] == list(range(warmup, total))       # from the first step at the peak rate
    assert [step for step, _, _ in book] == list(range(warmup + 1, total))    # the printed book: one step later


def test_train_model_bad_warmup():
    train, val = loaders()
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match='warmup_steps'):
        train_model(model, train, val, optimizer, 'cpu', 1, 1, 1, 'E', TOK, warmup_steps=len(train))
    assert all(p.grad is None for p in model.parameters())   # refused before the first step


# --- generate, re-exported from kv_cache -----------------------------------------------------------------
def test_generate_is_the_kv_cache_function():
    assert generate is kv_cache.generate


@pytest.mark.parametrize('max_new_tokens', [0, 5, 40])   # 40 runs past the context of 16
def test_generate_greedy_equals_the_books_loop(max_new_tokens):
    model = tiny_model(drop_rate=0.0).eval()
    idx = torch.tensor([TOK.encode('Every eff')])
    ours = generate(model, idx, max_new_tokens, TINY['context_length'])
    assert torch.equal(ours, book_generate(model, idx, max_new_tokens, TINY['context_length']))
    assert torch.equal(ours, generate_text_simple(model, idx, max_new_tokens, TINY['context_length']))


@pytest.mark.parametrize('temperature, top_k', [(1.0, None), (1.4, 25), (0.7, 3), (2.0, 1)])
def test_generate_sampling_equals_the_books_loop(temperature, top_k):
    model = tiny_model(drop_rate=0.0).eval()
    idx = torch.tensor([TOK.encode('Every')])
    torch.manual_seed(123)
    ours = generate(model, idx, 12, TINY['context_length'], temperature=temperature, top_k=top_k)
    torch.manual_seed(123)
    assert torch.equal(ours, book_generate(model, idx, 12, TINY['context_length'], temperature=temperature, top_k=top_k))


def test_generate_stops_at_eos():
    model = tiny_model(drop_rate=0.0).eval()
    idx = torch.tensor([TOK.encode('Every')])
    greedy = generate(model, idx, 10, TINY['context_length'])
    eos = int(greedy[0, idx.shape[1] + 2])       # the third new token
    ours = generate(model, idx, 10, TINY['context_length'], eos_id=eos)
    assert torch.equal(ours, book_generate(model, idx, 10, TINY['context_length'], eos_id=eos))


@pytest.mark.parametrize('kwargs, message', [({'temperature': -0.5}, 'temperature'), ({'top_k': 0}, 'top_k'),
                                             ({'temperature': math.nan}, 'finite'), ({'top_k': 1.5}, 'integer'),
                                             ({'top_k': VOCAB + 1}, 'top_k'), ({'max_new_tokens': -1}, 'max_new_tokens')])
def test_generate_bad_arguments(kwargs, message):
    model = tiny_model().eval()
    args = {'max_new_tokens': 3, 'context_size': TINY['context_length'], **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[1, 2, 3]]), **args)
