"The trainer: token files, data order, optimizer, schedule, checkpoints (atomic, validated), exact resume, NaN stop, compile fallback."
import json
import math
import shutil

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data.distributed import DistributedSampler

import llm_from_scratch.trainer as trainer_mod
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.pretrain import calc_lr
from llm_from_scratch.text import GPTDatasetV1
from llm_from_scratch.trainer import (
    MODEL_CONFIGS,
    CheckpointError,
    NonFiniteLossError,
    TokenWindows,
    Trainer,
    TrainConfig,
    batch_indices,
    epoch_order,
    find_checkpoint,
    load_checkpoint,
    lr_factor,
    make_optimizer,
    model_from_checkpoint,
    read_token_file,
    save_checkpoint,
    token_file_meta,
    tokenize_to_file,
)

from conftest import shared_data
from tiny_models import Interrupting

TINY = {**GPT_CONFIG_124M, 'vocab_size': 97, 'context_length': 16, 'emb_dim': 32, 'n_heads': 4, 'n_layers': 2, 'drop_rate': 0.1}
GPT2 = tiktoken.get_encoding('gpt2')


class CharTokenizer:
    "Characters to ids below TINY's vocabulary size, for the samples."
    n_vocab = 97

    def encode(self, text):
        return [ord(c) % 97 for c in text]

    def decode(self, ids):
        return ''.join(chr(32 + i) for i in ids)


def tiny_model(seed=123, **over):
    torch.manual_seed(seed)
    return GPTModel({**TINY, **over})


def random_windows(n_tokens=16 * 40 + 1, seed=0, max_length=16, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return TokenWindows(torch.randint(0, vocab, (n_tokens,), generator=g).numpy().astype(np.uint16), max_length)


def cfg(**over):
    return TrainConfig(**{'max_steps': 6, 'batch_size': 4, 'lr': 3e-3, 'warmup_steps': 2, 'device': 'cpu', 'progress': False, **over})


# --- token files -------------------------------------------------------------------------------------------------

def test_tokenize_in_pieces_equals_whole_text(tmp_path):
    shared_data()
    text = (shared_data()/'tinyshakespeare.txt').read_text(encoding='utf-8')[:300_000]
    (tmp_path/'t.txt').write_text(text, encoding='utf-8')
    out = tokenize_to_file(tmp_path/'t.txt', tmp_path/'t.bin', chunk_bytes=4096, quiet=True)
    tokens = read_token_file(out)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == GPT2.encode(text)
    assert token_file_meta(out)['n_tokens'] == len(tokens)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list(' \n\tab.,\'sé1<|>') + ['<|endoftext|>', '\n\n', '  ', 'word', '\r\n']), max_size=120).map(''.join),
       st.integers(1, 40))
def test_tokenize_in_pieces_random_texts(tmp_path_factory, text, chunk):
    d = tmp_path_factory.mktemp('tok')
    (d/'t.txt').write_bytes(text.encode('utf-8'))
    out = tokenize_to_file(d/'t.txt', d/'t.bin', chunk_bytes=chunk, quiet=True)
    assert read_token_file(out).tolist() == GPT2.encode(text, allowed_special={'<|endoftext|>'})


def test_tokenize_registry_name_and_uint32_for_large_vocabularies(tmp_path):
    shared_data()
    out = tokenize_to_file('the-verdict', tmp_path/'v.bin', quiet=True)
    assert token_file_meta(out)['n_tokens'] == 5145

    class BigVocab:  # ids beyond uint16's range
        n_vocab = 100_000
        def encode(self, text):
            return [70_000 + ord(c) for c in text]
    out = tokenize_to_file(shared_data()/'the-verdict.txt', tmp_path/'big.bin', tokenizer=BigVocab(), quiet=True)
    tokens = read_token_file(out)
    assert tokens.dtype == np.uint32 and tokens[0] == 70_000 + ord('I')


def test_token_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such text file'):
        tokenize_to_file(tmp_path/'nope.txt', tmp_path/'x.bin', quiet=True)
    with pytest.raises(FileNotFoundError, match='no such token file'):
        read_token_file(tmp_path/'nope.bin')
    (tmp_path/'plain.bin').write_bytes(b'\0' * 2000)
    with pytest.raises(ValueError, match='is not a token file'):
        read_token_file(tmp_path/'plain.bin')
    (tmp_path/'t.txt').write_text('hello world\nand more\n')
    out = tokenize_to_file(tmp_path/'t.txt', tmp_path/'t.bin', quiet=True)
    with open(out, 'ab') as f:
        f.write(b'\0')
    with pytest.raises(ValueError, match='truncated or was changed'):
        read_token_file(out)


@pytest.mark.parametrize('max_length,stride', [(4, 1), (8, 8), (16, 5), (256, 256)])
def test_token_windows_equal_gptdataset(tmp_path, max_length, stride):
    text = (shared_data()/'the-verdict.txt').read_text(encoding='utf-8')
    out = tokenize_to_file('the-verdict', tmp_path/'v.bin', quiet=True)
    ours, book = TokenWindows(out, max_length, stride), GPTDatasetV1(text, GPT2, max_length, stride)
    assert len(ours) == len(book)
    for i in [0, 1, len(book) // 2, len(book) - 1]:
        assert torch.equal(ours[i][0], book[i][0]) and torch.equal(ours[i][1], book[i][1])
    with pytest.raises(IndexError):
        ours[len(ours)]


def test_token_windows_bad_arguments():
    with pytest.raises(ValueError, match='hold no window'):
        TokenWindows(np.arange(5), max_length=5)
    with pytest.raises(ValueError, match='must be positive'):
        TokenWindows(np.arange(50), max_length=0)


# --- data order ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_shards_match_distributed_sampler(world_size):
    n, B = 36, 2
    for epoch in range(3):
        order = epoch_order(n, 7, epoch)
        shards = []
        for rank in range(world_size):
            s = DistributedSampler(range(n), num_replicas=world_size, rank=rank, seed=7)
            s.set_epoch(epoch)
            ours = torch.cat([batch_indices(order, p, B, rank, world_size) for p in range(0, n, B * world_size)]).tolist()
            assert ours == list(s)
            shards.append(set(ours))
        assert sum(len(x) for x in shards) == n and set().union(*shards) == set(range(n))
    assert not torch.equal(epoch_order(n, 7, 0), epoch_order(n, 7, 1))
    assert epoch_order(5, 7, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


# --- optimizer and schedule ------------------------------------------------------------------------------------

def test_optimizer_decays_matrices_only():
    model = tiny_model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay = {id(p) for p in opt.param_groups[0]['params']}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.dim() >= 2), name
    assert opt.param_groups[0]['weight_decay'] == 0.1 and opt.param_groups[1]['weight_decay'] == 0.0
    assert opt.defaults['fused'] is True            # available on CPU in this torch
    assert not make_optimizer(model, fused=False).defaults['fused']


def test_fused_and_foreach_adamw_agree():
    out = []
    for fused in (True, False):
        model = tiny_model(drop_rate=0.0)
        opt = make_optimizer(model, lr=1e-2, fused=fused)
        for _ in range(3):
            model(torch.arange(16).view(1, 16)).square().mean().backward()
            opt.step(); opt.zero_grad()
        out.append(model.out_head.weight.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_lr_factor():
    assert lr_factor(5, 10, 1e-3, schedule='constant') == 1.0
    assert math.isclose(lr_factor(0, 100, 1e-3, warmup_steps=10), 0.1)                  # starts at min_lr = lr / 10
    assert math.isclose(lr_factor(10, 100, 1e-3, warmup_steps=10), 1.0)
    assert math.isclose(lr_factor(100, 100, 1e-3, warmup_steps=10, min_lr=0.0), 0.0, abs_tol=1e-12)
    assert math.isclose(lr_factor(40, 100, 1e-3, 10, 1e-5, 2e-5) * 1e-3, calc_lr(40, 100, 10, 1e-3, 1e-5, 2e-5))
    with pytest.raises(ValueError, match='schedule must be one of'):
        lr_factor(0, 10, 1e-3, schedule='linear')


def test_train_config_validation():
    with pytest.raises(ValueError, match='batch_size'):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match='precision'):
        TrainConfig(precision='fp16')
    with pytest.raises(ValueError, match='schedule'):
        TrainConfig(schedule='step')
    with pytest.raises(ValueError, match='warmup_steps'):
        TrainConfig(max_steps=5, warmup_steps=5)
    TrainConfig(max_steps=5, warmup_steps=5, schedule='constant')
    c = TrainConfig.from_dict({'max_steps': 3, 'betas': [0.9, 0.95], 'unknown_key': 1})
    assert c.max_steps == 3 and c.betas == (0.9, 0.95)


# --- checkpoints ---------------------------------------------------------------------------------------------------

def save_two(tmp_path):
    model = tiny_model()
    run = tmp_path/'run'
    first = save_checkpoint(run, model, {'step': 1, 'x': torch.ones(2)}, {'model': model.cfg})
    with torch.no_grad():
        model.tok_emb.weight.add_(1)
    second = save_checkpoint(run, model, {'step': 2}, {'model': model.cfg})
    return model, run, first, second


def test_checkpoint_round_trip(tmp_path):
    model, run, first, second = save_two(tmp_path)
    assert (run/'latest').read_text().strip() == 'step-00000002' and find_checkpoint(run) == second
    assert sorted(p.name for p in second.iterdir()) == ['config.json', 'manifest.json', 'model.safetensors', 'state.pt']
    fresh = tiny_model(seed=9)
    info = load_checkpoint(run, fresh)
    assert info['state']['step'] == 2 and info['config']['model'] == model.cfg
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(load_checkpoint(first)['state']['x'], torch.ones(2))
    m = model_from_checkpoint(run)
    assert not m.training and torch.equal(m.tok_emb.weight, model.tok_emb.weight)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model = tiny_model()
    for step in range(1, 6):
        save_checkpoint(tmp_path/'run', model, {'step': step}, keep_last=1)
    assert sorted(p.name for p in (tmp_path/'run').iterdir()) == ['latest', 'step-00000004', 'step-00000005']
    save_checkpoint(tmp_path/'run', model, {'step': 5}, keep_last=1)  # the same step again
    assert find_checkpoint(tmp_path/'run').name == 'step-00000005'


@pytest.mark.parametrize('where', ['weights', 'state', 'interrupt'])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    model, run, first, second = save_two(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    if where == 'weights':  # the weights file is half written when the disk fills up
        def half_written(tensors, path, metadata=None):
            with open(path, 'wb') as f:
                f.write(b'\x08\x00' * 100)
            raise OSError(28, 'No space left on device')
        monkeypatch.setattr(trainer_mod, 'save_file', half_written)
        err = OSError
    elif where == 'state':
        monkeypatch.setattr(trainer_mod.torch, 'save', lambda *a, **k: (_ for _ in ()).throw(RuntimeError('disk error')))
        err = RuntimeError
    else:
        monkeypatch.setattr(trainer_mod, 'sha256sum', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        err = KeyboardInterrupt
    with pytest.raises(err):
        save_checkpoint(run, model, {'step': 3}, {'model': model.cfg})
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == before
    assert load_checkpoint(run, tiny_model())['path'] == second


def test_damaged_checkpoints_name_file_and_problem(tmp_path):
    model, run, first, second = save_two(tmp_path)
    ck = tmp_path/'ck'

    def fresh_copy():
        shutil.rmtree(ck, ignore_errors=True)
        shutil.copytree(second, ck)
        return ck

    with open(fresh_copy()/'model.safetensors', 'r+b') as f:
        f.truncate(500)
    with pytest.raises(CheckpointError, match=r'model\.safetensors has 500 bytes but the manifest says'):
        load_checkpoint(ck)
    (ck/'manifest.json').unlink()  # without a manifest, safetensors itself notices
    with pytest.raises(CheckpointError, match=r'model\.safetensors is not a complete safetensors file'):
        load_checkpoint(ck, tiny_model())

    data = bytearray((fresh_copy()/'model.safetensors').read_bytes())
    data[-3] ^= 0xFF
    (ck/'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r'model\.safetensors does not match the SHA-256'):
        load_checkpoint(ck)
    load_checkpoint(ck, verify=False)  # sizes still agree: only the checksum can tell

    (fresh_copy()/'state.pt').unlink()
    with pytest.raises(CheckpointError, match=r'state\.pt is missing'):
        load_checkpoint(ck)

    fresh_copy()
    (ck/'manifest.json').unlink()
    (ck/'state.pt').write_bytes((ck/'state.pt').read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r'state\.pt cannot be read'):
        load_checkpoint(ck)

    fresh_copy()
    (ck/'manifest.json').unlink()
    (ck/'config.json').write_text('{"model": ')
    with pytest.raises(CheckpointError, match=r'config\.json is not valid JSON'):
        load_checkpoint(ck)

    (run/'latest').write_text('step-00000099\n')
    with pytest.raises(CheckpointError, match="names 'step-00000099'"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match='no such checkpoint'):
        load_checkpoint(tmp_path/'nowhere')
    (tmp_path/'empty').mkdir()
    with pytest.raises(CheckpointError, match='is not a checkpoint'):
        load_checkpoint(tmp_path/'empty')


def test_mismatched_model_names_key_or_tensor(tmp_path):
    model, run, first, second = save_two(tmp_path)
    with pytest.raises(CheckpointError, match=r"'n_layers' = 2, the model has 3"):
        load_checkpoint(run, tiny_model(n_layers=3))
    load_checkpoint(run, tiny_model(attn_impl='sdpa', drop_rate=0.0))  # how it runs may differ
    bare = save_checkpoint(tmp_path/'bare', model, {'step': 1})     # no config: the tensors are compared
    with pytest.raises(CheckpointError, match=r"tensor 'tok_emb\.weight' has shape \(97, 32\), the model's has \(97, 64\)"):
        load_checkpoint(bare, tiny_model(emb_dim=64))
    with pytest.raises(CheckpointError, match=r"lacks 6 of the model's tensors, e\.g\. 'trf_blocks\.0\.att\.W_query\.bias'"):
        load_checkpoint(bare, tiny_model(qkv_bias=True))
    with pytest.raises(CheckpointError, match=r'has \d+ tensors the model does not'):
        load_checkpoint(bare, tiny_model(n_layers=1))


def test_tied_weights_are_saved_once(tmp_path):
    model = tiny_model()
    model.out_head.weight = model.tok_emb.weight
    path = save_checkpoint(tmp_path/'run', model, {'step': 1})
    fresh = tiny_model(seed=5)
    load_checkpoint(path, fresh)
    assert torch.equal(fresh.out_head.weight, model.tok_emb.weight)
    # stored once: about one embedding table smaller than an untied save
    untied = save_checkpoint(tmp_path/'untied', tiny_model(), {'step': 1})
    size = lambda p: (p/'model.safetensors').stat().st_size
    assert size(untied) - size(path) >= 97 * 32 * 4


# --- the trainer ---------------------------------------------------------------------------------------------------

def test_training_reduces_loss_and_logs(tmp_path):
    data, val = random_windows(), random_windows(seed=1, n_tokens=16 * 8 + 1)
    t = Trainer(tiny_model(), data, val, cfg(max_steps=12, eval_interval=6), run_dir=tmp_path/'run', tokenizer=CharTokenizer())
    h = t.fit()
    assert h['step'] == list(range(1, 13)) and h['eval_step'] == [6, 12]
    assert h['loss'][-1] < h['loss'][0]
    assert h['tokens_seen'][-1] == 12 * 4 * 16
    lines = [json.loads(x) for x in (tmp_path/'run'/'log.jsonl').read_text().splitlines()]
    assert [x['step'] for x in lines if 'loss' in x] == list(range(1, 13))
    assert [x['val_loss'] for x in lines if 'val_loss' in x] == h['val_loss']
    assert find_checkpoint(tmp_path/'run').name == 'step-00000012'
    tok = CharTokenizer()
    sample = t.sample('Every effort', 3)
    assert sample.startswith(tok.decode(tok.encode('Every effort'))) and len(sample) == len('Every effort') + 3


def test_lr_follows_schedule():
    t = Trainer(tiny_model(), random_windows(), None, cfg(max_steps=8, warmup_steps=3, lr=1e-2, min_lr=1e-4, initial_lr=1e-3))
    h = t.fit()
    expected = [calc_lr(s, 8, 3, 1e-2, 1e-3, 1e-4) for s in range(8)]
    np.testing.assert_allclose(h['lr'], expected, rtol=1e-9)


def test_too_little_data():
    t = Trainer(tiny_model(), random_windows(n_tokens=16 * 3 + 1), None, cfg(batch_size=4))
    with pytest.raises(ValueError, match='fewer than one batch'):
        t.fit()


@pytest.mark.parametrize('grad_accum,precision', [(1, 'fp32'), (2, 'fp32'), (1, 'bf16')])
def test_resume_after_crash_repeats_the_run(tmp_path, grad_accum, precision):
    "N steps straight equal k steps, a crash in the middle of step k + 1 or later, and a resume (dropout 0.1, several epochs)."
    data = random_windows(n_tokens=16 * 20 + 1)  # 20 windows: an epoch is 5 micro-batches of 4
    c = cfg(max_steps=9, grad_accum=grad_accum, ckpt_interval=3, precision=precision)
    straight = Trainer(tiny_model(), data, None, c, run_dir=tmp_path/'a')
    losses = straight.fit()['loss']

    crashing = Trainer(tiny_model(), Interrupting(data, after=4 * 4 * grad_accum + 3), None, c, run_dir=tmp_path/'b')
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert find_checkpoint(tmp_path/'b').name == 'step-00000003' and crashing.step == 4
    resumed = Trainer(tiny_model(seed=999), data, None, c, run_dir=tmp_path/'b')  # a new process: other initial weights
    h = resumed.fit(resume=tmp_path/'b')
    torch.testing.assert_close(torch.tensor(h['loss']), torch.tensor(losses), rtol=1e-6, atol=1e-6)
    for a, b in zip(straight.raw.state_dict().values(), resumed.raw.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (resumed.epoch, resumed.position) == (straight.epoch, straight.position)
    log = [json.loads(x)['step'] for x in (tmp_path/'b'/'log.jsonl').read_text().splitlines()]
    assert log == list(range(1, 10))  # step 4 of the crashed run was logged and then forgotten


def test_resume_into_a_different_model_names_the_key(tmp_path):
    data = random_windows()
    Trainer(tiny_model(), data, None, cfg(max_steps=2, warmup_steps=0), run_dir=tmp_path/'run').fit()
    t = Trainer(tiny_model(emb_dim=64), data, None, cfg(max_steps=4), run_dir=tmp_path/'run')
    with pytest.raises(CheckpointError, match="'emb_dim' = 32, the model has 64"):
        t.fit(resume=tmp_path/'run')


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    model, calls = tiny_model(), []

    def poison(module, args, output):
        calls.append(1)
        return output * bad if len(calls) >= 6 else output
    model.register_forward_hook(poison)
    t = Trainer(model, random_windows(), None, cfg(max_steps=10, ckpt_interval=2), run_dir=tmp_path/'run')
    with pytest.raises(NonFiniteLossError, match=r'The loss is (nan|inf) at step 6: .*step-00000004'):
        t.fit()
    good = tiny_model(seed=1)
    assert load_checkpoint(tmp_path/'run', good)['path'].name == 'step-00000004'
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied


def test_compile_failure_falls_back_to_eager(monkeypatch):
    real_compile = torch.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError('this backend cannot compile anything')
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: real_compile(m, backend=broken_backend))
    data = random_windows()
    compiled = Trainer(tiny_model(), data, None, cfg(max_steps=3, compile=True))
    with pytest.warns(UserWarning, match='torch.compile failed'):
        h1 = compiled.fit()
    monkeypatch.undo()
    h2 = Trainer(tiny_model(), data, None, cfg(max_steps=3)).fit()
    # the failed attempt drew dropout masks, so the first step differs; the run goes on
    assert len(h1['loss']) == 3 and all(math.isfinite(x) for x in h1['loss'])
    assert abs(h1['loss'][0] - h2['loss'][0]) < 0.1


def test_gradient_accumulation_equals_a_large_batch():
    out = []
    for bs, acc in [(8, 1), (4, 2), (2, 4)]:
        c = cfg(max_steps=2, warmup_steps=0, batch_size=bs, grad_accum=acc, shuffle=False)
        t = Trainer(tiny_model(drop_rate=0.0), random_windows(), None, c)
        t.fit()
        out.append(t.raw.state_dict())
    for other in out[1:]:  # Adam divides by the gradients' scale, so float rounding shows: compare to 1/300 of an update
        for k in out[0]:
            torch.testing.assert_close(out[0][k], other[k], rtol=1e-4, atol=1e-5)


def test_model_configs_build():
    for name, c in MODEL_CONFIGS.items():
        if not name.startswith('gpt2-'):
            assert GPTModel(c)(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50257)


def test_fused_kernels_compute_the_same_function():
    from llm_from_scratch.gpt import GELU, LayerNorm
    from llm_from_scratch.trainer import FusedGELU, FusedLayerNorm, use_fused_kernels
    cfg = {**TINY, 'emb_dim': 64, 'drop_rate': 0.0}
    book, fused = tiny_model(**cfg), use_fused_kernels(tiny_model(**cfg, attn_impl='sdpa'))
    fused.load_state_dict(book.state_dict())
    assert not any(type(m) in (LayerNorm, GELU) for m in fused.modules())
    assert sum(isinstance(m, FusedLayerNorm) for m in fused.modules()) == 2 * 2 + 1
    assert sum(isinstance(m, FusedGELU) for m in fused.modules()) == 2
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    for m in (book, fused):
        (m(idx) * torch.linspace(-1, 1, 97)).sum().backward()
    torch.testing.assert_close(fused(idx), book(idx), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(book.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert fused.trf_blocks[0].norm1.scale is fused.state_dict(keep_vars=True)['trf_blocks.0.norm1.scale']
