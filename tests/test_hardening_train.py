"Faults and bad inputs of the trainer and of `llm-from-scratch pretrain` / `generate`: each one a clear line, nothing lost."
import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as st_save_file

import llm_from_scratch.trainer as trainer_mod
from llm_from_scratch.cli import main
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.trainer import (
    MODEL_CONFIGS,
    CheckpointError,
    NonFiniteLossError,
    TokenWindows,
    Trainer,
    TrainConfig,
    find_checkpoint,
    load_checkpoint,
    lr_factor,
    model_from_checkpoint,
    save_checkpoint,
)

from conftest import shared_data
from tiny_models import Interrupting

TINY = {**GPT_CONFIG_124M, 'vocab_size': 97, 'context_length': 16, 'emb_dim': 32, 'n_heads': 4, 'n_layers': 2,
        'drop_rate': 0.0}
TINY_RUN = ['--config', 'gpt-small-test', '--batch-size', '2', '--lr', '1e-2', '--warmup-steps', '1', '--quiet',
            '--sample-interval', '0']


def tiny_model(seed=123):
    torch.manual_seed(seed)
    return GPTModel(TINY)


def windows(n_tokens=16 * 40 + 1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TokenWindows(torch.randint(0, 97, (n_tokens,), generator=g).numpy().astype(np.uint16), 16)


def cfg(**over):
    return TrainConfig(**{'max_steps': 6, 'batch_size': 4, 'lr': 3e-3, 'warmup_steps': 1, 'device': 'cpu',
                          'progress': False, **over})


def one_line_error(capsys, argv):
    "Run the CLI in this process; its error must be one line on stderr, with a non-zero status."
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.count('\n') == 1 and 'Traceback' not in err, (status, err)
    return err


def leftovers(run_dir):
    return [p.name for p in run_dir.iterdir() if p.name.startswith('.')]


# --- 1. a full disk during a save ----------------------------------------------------------------------------------

def fill_disk_on_call(monkeypatch, n, code=errno.ENOSPC):
    "Make the n-th weights file written run out of space half-way."
    calls, real = [], trainer_mod.save_file

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) < n:
            return real(tensors, path, metadata=metadata)
        with open(path, 'wb') as f:
            f.write(b'\0' * 1000)
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(trainer_mod, 'save_file', save_file)


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_during_save_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, code):
    run = tmp_path/'run'
    model = tiny_model()
    fill_disk_on_call(monkeypatch, 2, code)
    save_checkpoint(run, model, {'step': 2}, {'model': model.cfg})
    with pytest.raises(OSError) as e:
        save_checkpoint(run, model, {'step': 4}, {'model': model.cfg})
    monkeypatch.undo()
    msg = str(e.value)
    assert e.value.errno == code and '\n' not in msg
    assert 'full' in msg and str(run) in msg and 'step-00000002' in msg and 'intact' in msg, msg
    assert leftovers(run) == [] and sorted(p.name for p in run.iterdir()) == ['latest', 'step-00000002']
    assert load_checkpoint(run, tiny_model(seed=1))['path'].name == 'step-00000002'


def _raises_like_a_full_disk(kind):
    "The errors a full disk really gives: safetensors' Rust error as text, torch.save's short write without errno."
    from safetensors import SafetensorError

    def failing(*a, **k):
        if kind == 'safetensors':
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" }) (os error 28)')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    return failing


@pytest.mark.parametrize('kind', ['safetensors', 'torch.save'])
def test_disk_full_in_the_big_files_is_disk_full_too(tmp_path, monkeypatch, kind):
    "The two large files fail with other exception types than OSError; they used to escape as raw tracebacks."
    run, model = tmp_path/'run', tiny_model()
    save_checkpoint(run, model, {'step': 2}, {'model': model.cfg})
    if kind == 'safetensors':
        monkeypatch.setattr(trainer_mod, 'save_file', _raises_like_a_full_disk(kind))
    else:
        monkeypatch.setattr(trainer_mod.torch, 'save', _raises_like_a_full_disk(kind))
        monkeypatch.setattr(trainer_mod.shutil, 'disk_usage', lambda p: shutil_usage(0))
    with pytest.raises(trainer_mod.DiskFullError, match='full') as e:
        save_checkpoint(run, model, {'step': 4}, {'model': model.cfg})
    monkeypatch.undo()
    assert 'step-00000002' in str(e.value) and leftovers(run) == []
    assert load_checkpoint(run, tiny_model(seed=1))['path'].name == 'step-00000002'


def test_a_runtime_error_with_room_on_disk_is_not_called_disk_full(tmp_path, monkeypatch):
    "Only a disk without room for the weights turns torch.save's errno-less error into DiskFullError."
    run, model = tmp_path/'run', tiny_model()
    monkeypatch.setattr(trainer_mod.torch, 'save', _raises_like_a_full_disk('torch.save'))
    with pytest.raises(RuntimeError) as e:
        save_checkpoint(run, model, {'step': 2}, {'model': model.cfg})
    assert not isinstance(e.value, trainer_mod.DiskFullError)


def shutil_usage(free):
    import shutil
    return shutil._ntuple_diskusage(10**9, 10**9 - free, free)


def test_a_really_full_disk(tmp_path):
    "A 2 MiB tmpfs filled by a checkpoint: the real errors of a full disk, where this machine lets us mount one."
    mnt = tmp_path/'small'
    mnt.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip('cannot mount a small tmpfs here')
    try:
        for weights, state in [({'w': torch.zeros(10**6)}, {'step': 1}),
                               ({'w': torch.zeros(2 * 10**5)}, {'step': 1, 'opt': torch.zeros(6 * 10**5)})]:
            with pytest.raises(trainer_mod.DiskFullError, match='full'):
                save_checkpoint(mnt/'run', weights, state)
            assert leftovers(mnt/'run') == []
    finally:
        subprocess.run(['umount', '-l', str(mnt)], capture_output=True)


def test_disk_full_during_pretrain_is_one_line(tmp_path, monkeypatch, capsys):
    shared_data()
    fill_disk_on_call(monkeypatch, 2)
    out = tmp_path/'run'
    err = one_line_error(capsys, ['pretrain', *TINY_RUN, '--steps', '4', '--ckpt-interval', '2', '--out', str(out)])
    assert 'full' in err and 'step-00000002' in err and 'intact' in err, err
    monkeypatch.undo()
    assert find_checkpoint(out).name == 'step-00000002' and leftovers(out) == []
    assert main(['pretrain', '--out', str(out), '--resume', '--quiet']) == 0  # and the run resumes from it
    assert find_checkpoint(out).name == 'step-00000004'


# --- 2. non-finite weights are neither saved nor loaded ------------------------------------------------------------

def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path/'run', model, {'step': 2}, {'model': model.cfg})
    with torch.no_grad():
        model.trf_blocks[1].ff.layers[0].weight[0, 0] = float('nan')
        model.final_norm.scale[3] = float('inf')
    with pytest.raises(CheckpointError, match=r"trf_blocks\.1\.ff\.layers\.0\.weight.*final_norm\.scale") as e:
        save_checkpoint(tmp_path/'run', model, {'step': 4}, {'model': model.cfg})
    assert 'step-00000002' in str(e.value)
    assert sorted(p.name for p in (tmp_path/'run').iterdir()) == ['latest', 'step-00000002']


@pytest.mark.filterwarnings('ignore:Seems like:UserWarning')
def test_trainer_stops_when_the_weights_turn_non_finite(tmp_path):
    t = Trainer(tiny_model(), windows(), None, cfg(max_steps=8, ckpt_interval=2), run_dir=tmp_path/'run')
    real_step, calls = t.optimizer.step, []

    def step(*a, **k):  # the 4th update leaves an infinite weight behind, with a finite loss before it
        out = real_step(*a, **k)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                t.raw.tok_emb.weight[5, 5] = float('inf')
        return out
    t.optimizer.step = step
    with pytest.raises(NonFiniteLossError, match=r"tok_emb\.weight.*step-00000002"):
        t.fit()
    assert find_checkpoint(tmp_path/'run').name == 'step-00000002'
    assert not list((tmp_path/'run').glob('step-00000004'))


def nan_checkpoint(folder, cfg):
    "A hand-made checkpoint (no manifest) whose weights hold NaN."
    model = GPTModel(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd['trf_blocks.0.att.W_query.weight'][0, 0] = float('nan')
    folder.mkdir(parents=True)
    st_save_file(sd, folder/'model.safetensors')
    torch.save({'step': 1}, folder/'state.pt')
    (folder/'config.json').write_text(json.dumps({'step': 1, 'model': cfg, 'tokenizer': 'gpt2'}))
    return folder


def test_loading_non_finite_weights_names_the_tensor(tmp_path, capsys):
    ckpt = nan_checkpoint(tmp_path/'bad', MODEL_CONFIGS['gpt-small-test'])
    with pytest.raises(CheckpointError, match=r"trf_blocks\.0\.att\.W_query\.weight.*NaN or inf"):
        model_from_checkpoint(ckpt)
    err = one_line_error(capsys, ['generate', str(ckpt), 'Hello', '--device', 'cpu'])
    assert 'trf_blocks.0.att.W_query.weight' in err, err
    assert capsys.readouterr().out == ''


# --- 3. settings given with --resume -------------------------------------------------------------------------------

def test_resume_applies_a_new_learning_rate(tmp_path):
    data = windows()
    Trainer(tiny_model(), data, None, cfg(max_steps=2, ckpt_interval=2), run_dir=tmp_path/'run').fit()
    t = Trainer(tiny_model(), data, None, cfg(max_steps=4, lr=1e-4), run_dir=tmp_path/'run')
    h = t.fit(resume=tmp_path/'run')
    expected = [1e-4 * lr_factor(s, 4, 1e-4, 1) for s in (2, 3)]
    np.testing.assert_allclose(h['lr'][2:], expected, rtol=1e-9)


def test_cli_resume_applies_or_refuses_settings(tmp_path, capsys):
    shared_data()
    out = tmp_path/'run'
    assert main(['pretrain', *TINY_RUN, '--steps', '2', '--out', str(out)]) == 0
    assert main(['pretrain', '--out', str(out), '--resume', '--steps', '4', '--lr', '5e-3', '--quiet']) == 0
    config = json.loads((out/'step-00000004'/'config.json').read_text())
    assert config['train']['lr'] == 5e-3
    logged = [r['lr'] for r in map(json.loads, (out/'log.jsonl').read_text().splitlines()) if 'loss' in r]
    np.testing.assert_allclose(logged[2:], [5e-3 * lr_factor(s, 4, 5e-3, 1) for s in (2, 3)], rtol=1e-9)
    for option, value in [('--batch-size', '4'), ('--seed', '7'), ('--context-length', '16'), ('--data', 'tinyshakespeare')]:
        err = one_line_error(capsys, ['pretrain', '--out', str(out), '--resume', '--steps', '6', option, value])
        assert option in err and 'keeps' in err, err
    assert find_checkpoint(out).name == 'step-00000004'


# --- 4. one run per folder -----------------------------------------------------------------------------------------

HOLDER = textwrap.dedent('''
    import os, sys, time
    from llm_from_scratch.trainer import run_lock
    lock = run_lock(sys.argv[1])
    lock.__enter__()
    print('held', flush=True)
    if sys.argv[2] == 'die':
        os._exit(0)  # killed: the lock file stays behind
    time.sleep(120)
''')


def hold_lock(run_dir, mode):
    p = subprocess.Popen([sys.executable, '-c', HOLDER, str(run_dir), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'held'
    return p


def test_a_live_lock_refuses_a_second_run(tmp_path, capsys):
    run = tmp_path/'run'
    holder = hold_lock(run, 'live')
    try:
        t = Trainer(tiny_model(), windows(), None, cfg(max_steps=2), run_dir=run)
        with pytest.raises(trainer_mod.RunLockedError, match=f'PID {holder.pid}') as e:
            t.fit()
        assert os.uname().nodename in str(e.value) and t.step == 0
        err = one_line_error(capsys, ['pretrain', *TINY_RUN, '--steps', '2', '--out', str(run)])
        assert f'PID {holder.pid}' in err and 'started' in err, err
        assert not (run/'log.jsonl').exists() and not list(run.glob('step-*'))
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_lock_record_does_not_lock_out_the_same_process(tmp_path, monkeypatch):
    "If writing the holder's details fails, the lock is let go (it used to leak and refuse this very process)."
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(trainer_mod.os, 'write', full)
    with pytest.raises(OSError):
        with trainer_mod.run_lock(tmp_path/'run'):
            pass
    monkeypatch.setattr(trainer_mod.os, 'write', real_write)
    with trainer_mod.run_lock(tmp_path/'run'):
        pass


def test_a_stale_lock_does_not_block(tmp_path):
    run = tmp_path/'run'
    dead = hold_lock(run, 'die')
    dead.wait()
    assert (run/'run.lock').is_file()
    Trainer(tiny_model(), windows(), None, cfg(max_steps=2), run_dir=run).fit()
    assert find_checkpoint(run).name == 'step-00000002'
    assert not (run/'run.lock').exists()  # released when the run ends


# --- 5. the log holds each step once -------------------------------------------------------------------------------

def logged_steps(run):
    return [r['step'] for r in map(json.loads, (run/'log.jsonl').read_text().splitlines()) if 'loss' in r]


def test_a_restart_without_a_checkpoint_starts_a_fresh_log(tmp_path):
    run, data = tmp_path/'run', windows()
    for _ in range(2):  # killed at step 4, twice, before the first checkpoint
        with pytest.raises(KeyboardInterrupt):
            Trainer(tiny_model(), Interrupting(data, after=3 * 4 + 2), None, cfg(max_steps=6), run_dir=run).fit()
    assert logged_steps(run) == [1, 2, 3]
    Trainer(tiny_model(), data, None, cfg(max_steps=6), run_dir=run).fit()
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]


def test_resume_drops_a_half_written_log_line(tmp_path):
    run, data = tmp_path/'run', windows()
    Trainer(tiny_model(), data, None, cfg(max_steps=4, ckpt_interval=2), run_dir=run).fit(steps=2)
    with open(run/'log.jsonl', 'a') as f:
        f.write('{"step": 3, "lo')  # killed in the middle of a write
    Trainer(tiny_model(), data, None, cfg(max_steps=4), run_dir=run).fit(resume=run)
    assert logged_steps(run) == [1, 2, 3, 4]


# --- 6. run lengths and intervals ----------------------------------------------------------------------------------

@pytest.mark.parametrize('option,value', [('--epochs', '0'), ('--epochs', '-1'), ('--epochs', 'nan'),
                                          ('--ckpt-interval', '-1'), ('--eval-interval', '-1'),
                                          ('--sample-interval', '-1'), ('--steps', '0')])
def test_pretrain_rejects_non_positive_lengths_and_negative_intervals(tmp_path, capsys, option, value):
    err = one_line_error(capsys, ['pretrain', *TINY_RUN, option, value, '--out', str(tmp_path/'run')])
    assert option in err, err
    assert not (tmp_path/'run').exists()


@pytest.mark.parametrize('key', ['ckpt_interval', 'eval_interval', 'sample_interval'])
def test_train_config_rejects_negative_intervals(key):
    with pytest.raises(ValueError, match=f'TrainConfig.{key}'):
        cfg(**{key: -1})


# --- 7. a prompt longer than the context ---------------------------------------------------------------------------

def test_generate_refuses_a_prompt_longer_than_the_context(tmp_path, capsys):
    model_cfg = MODEL_CONFIGS['gpt-small-test']  # 32 tokens of context
    torch.manual_seed(0)
    save_checkpoint(tmp_path/'run', GPTModel(model_cfg), {'step': 1}, {'model': model_cfg, 'tokenizer': 'gpt2'})
    err = one_line_error(capsys, ['generate', str(tmp_path/'run'), ' '.join(['one', 'two'] * 20), '--device', 'cpu'])
    assert 'the prompt is 40 tokens long' in err and 'context holds 32 tokens' in err, err
    assert capsys.readouterr().out == ''


# --- 8. a quick --help ---------------------------------------------------------------------------------------------

LIGHT = textwrap.dedent('''
    import sys
    from llm_from_scratch.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    heavy = sorted(m for m in ('torch', 'tiktoken', 'transformers', 'numpy') if m in sys.modules)
    print('STATUS', code, 'HEAVY', heavy)
''')


@pytest.mark.parametrize('args,status', [(['--help'], 0), ([], 2), (['-h'], 0)])
def test_help_imports_nothing_heavy(args, status):
    r = subprocess.run([sys.executable, '-c', LIGHT, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f'STATUS {status} HEAVY []', r.stdout
    for command in ('doctor', 'pretrain', 'generate', 'finetune-classifier', 'classify', 'finetune-instruct',
                    'finetune-dpo', 'serve'):
        assert command in r.stdout


def test_the_quick_help_lists_what_the_full_parser_has():
    from llm_from_scratch import cli
    full = cli.build_parser()._subparsers._group_actions[0]
    quick = cli._quick_parser()._subparsers._group_actions[0]
    helps = lambda action: {a.dest: a.help for a in action._choices_actions}
    assert helps(quick) == helps(full)


# --- sampling settings on the command line: one check shared with generate and the server ---------------------------

@pytest.fixture
def tiny_run(tmp_path):
    model_cfg = MODEL_CONFIGS['gpt-small-test']
    torch.manual_seed(0)
    save_checkpoint(tmp_path/'run', GPTModel(model_cfg), {'step': 1}, {'model': model_cfg, 'tokenizer': 'gpt2'})
    return tmp_path/'run'


@pytest.mark.parametrize('temperature', ['nan', 'inf', '-1', '-inf'])
def test_generate_refuses_bad_temperatures(tiny_run, capsys, temperature):
    "nan used to pass as greedy and inf to crash: one line naming the value, as the server says."
    err = one_line_error(capsys, ['generate', str(tiny_run), 'Hello', f'--temperature={temperature}', '--device', 'cpu'])
    assert 'temperature must be a finite number >= 0' in err, err


@pytest.mark.parametrize('temperature,top_k', [('1e-45', None), ('5e-324', '5'), ('1e308', '5'), ('1e308', None)])
def test_generate_samples_at_extreme_temperatures(tiny_run, capsys, temperature, top_k):
    "Accepted temperatures sample without a traceback (1e-45 and 1e308 with top-k used to crash)."
    argv = ['generate', str(tiny_run), 'Hello', '--temperature', temperature, '--max-new-tokens', '4', '--device', 'cpu']
    assert main(argv + (['--top-k', top_k] if top_k else [])) == 0
    assert capsys.readouterr().out.startswith('Hello')
