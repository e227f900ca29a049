"`llm-from-scratch pretrain` and `generate`: a short run, generation from its checkpoint, resumption, and one-line errors."
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from llm_from_scratch.cli import main
from llm_from_scratch.trainer import TokenWindows, find_checkpoint, read_token_file, tokenize_to_file

from conftest import shared_data

TINY_RUN = ['--config', 'gpt-small-test', '--batch-size', '2', '--lr', '1e-2', '--warmup-steps', '1', '--quiet']


def run(*args, env=None):
    "The console script, as a user runs it."
    exe = shutil.which('llm-from-scratch')
    cmd = [exe, *args] if exe else [sys.executable, '-c', 'import sys; from llm_from_scratch.cli import main; sys.exit(main())', *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A 6-step run of the tiny model on the-verdict, made once by the console script."
    shared_data()
    home = tmp_path_factory.mktemp('home')
    env = {**os.environ, 'LLM_FROM_SCRATCH_HOME': str(home), 'OMP_NUM_THREADS': '1'}
    out = home/'run'
    r = run('pretrain', *TINY_RUN, '--steps', '6', '--eval-interval', '3', '--sample-interval', '3', '--out', str(out), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r, env


def test_pretrain_saves_a_checkpoint_and_says_where(trained):
    out, r, env = trained
    assert find_checkpoint(out).name == 'step-00000006'
    assert f'saved {out}/step-00000006' in r.stdout
    assert 'step 3: train loss' in r.stdout and "step 3: 'Every effort moves you" in r.stdout  # evaluation and a sample
    assert (out.parent/'tokens'/'the-verdict.bin').is_file()                                 # tokenized once, cached
    config = json.loads((out/'step-00000006'/'config.json').read_text())
    assert config['model']['emb_dim'] == 32 and config['train']['max_steps'] == 6 and config['meta']['data'] == 'the-verdict'


def test_generate_streams_a_continuation(trained):
    out, _, env = trained
    r = run('generate', str(out), 'Every effort moves you', '--max-new-tokens', '8', '--device', 'cpu', env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('Every effort moves you') and len(r.stdout) > len('Every effort moves you\n')
    sampled = run('generate', str(out/'step-00000006'), 'Every effort', '--max-new-tokens', '8', '--temperature', '1.5',
                  '--top-k', '50', '--seed', '1', env=env)
    assert sampled.returncode == 0 and sampled.stdout.startswith('Every effort'), sampled.stderr


def test_generate_writes_each_token_as_it_comes(trained, monkeypatch):
    out, _, _ = trained

    class Recorder:
        def __init__(self):
            self.writes, self.flushes = [], 0
        def write(self, s):
            self.writes.append(s)
        def flush(self):
            self.flushes += 1
    rec = Recorder()
    monkeypatch.setattr(sys, 'stdout', rec)
    assert main(['generate', str(out), 'Every effort moves you', '--max-new-tokens', '12', '--device', 'cpu']) == 0
    monkeypatch.undo()
    assert rec.flushes >= 10  # one flush per token (fewer only if the model emitted <|endoftext|>)
    assert rec.writes[0] == 'Every effort moves you' and rec.writes[-1].endswith('\n')


def test_resume_continues_the_run(trained, tmp_path):
    out, _, env = trained
    run_copy = tmp_path/'run'
    shutil.copytree(out, run_copy)
    r = run('pretrain', '--out', str(run_copy), '--resume', '--steps', '9', '--quiet', env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert find_checkpoint(run_copy).name == 'step-00000009'
    config = json.loads((run_copy/'step-00000009'/'config.json').read_text())
    assert config['train']['batch_size'] == 2 and config['train']['lr'] == 1e-2  # the run's settings, not the defaults
    records = [json.loads(x) for x in (run_copy/'log.jsonl').read_text().splitlines()]
    steps = [r['step'] for r in records if 'loss' in r]
    assert steps == list(range(1, 10))


def test_pretrain_on_a_text_file_and_on_a_token_file(tmp_path, capsys):
    text = (shared_data()/'tinyshakespeare.txt').read_text()[:8_000]
    (tmp_path/'shakespeare.txt').write_text(text)
    assert main(['pretrain', *TINY_RUN, '--data', str(tmp_path/'shakespeare.txt'), '--steps', '2', '--out', str(tmp_path/'a'),
                 '--sample-interval', '0']) == 0
    assert 'training windows of 32 tokens from shakespeare-' in capsys.readouterr().out
    tokens = tokenize_to_file(tmp_path/'shakespeare.txt', tmp_path/'tokens.bin', quiet=True)
    assert main(['pretrain', *TINY_RUN, '--data', str(tokens), '--epochs', '0.1', '--out', str(tmp_path/'b'),
                 '--sample-interval', '0']) == 0
    ids = read_token_file(tokens)
    n_windows = len(TokenWindows(ids[:int(len(ids) * 0.9)], 32))
    assert find_checkpoint(tmp_path/'b').name == f'step-{math.ceil(0.1 * n_windows / 2):08d}'  # 0.1 epochs of batches of 2


def one_line_error(capsys, argv):
    status = main(argv)
    err = capsys.readouterr().err
    assert status != 0 and err.count('\n') == 1 and 'Traceback' not in err, err
    return err


def test_one_line_errors(tmp_path, capsys, trained):
    out, _, _ = trained
    assert 'neither a file nor a known corpus (the-verdict, tinyshakespeare)' in one_line_error(
        capsys, ['pretrain', '--data', str(tmp_path/'missing.txt')])
    assert "unknown config 'gpt5'; known configs: gpt2-124m, gpt2-355m" in one_line_error(capsys, ['pretrain', '--config', 'gpt5'])
    assert 'no such checkpoint or run folder' in one_line_error(capsys, ['generate', str(tmp_path/'nowhere'), 'Hello'])
    assert 'give a checkpoint folder and a prompt' in one_line_error(capsys, ['generate', 'Hello'])
    assert "unknown model 'gpt9'" in one_line_error(capsys, ['generate', '--model', 'gpt9', 'Hello'])
    assert 'temperature' in one_line_error(capsys, ['generate', str(out), 'Hello', '--temperature', '-1'])
    (tmp_path/'empty').mkdir()
    assert 'is not a checkpoint' in one_line_error(capsys, ['pretrain', '--resume', str(tmp_path/'empty')])
    shutil.copytree(out, tmp_path/'taken')
    assert 'already holds a run: --resume continues it' in one_line_error(
        capsys, ['pretrain', *TINY_RUN, '--steps', '2', '--out', str(tmp_path/'taken')])


def test_errors_from_the_console_script_are_one_line(tmp_path):
    r = run('generate', str(tmp_path/'nowhere'), 'Hello')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
    assert r.stderr.startswith('llm-from-scratch generate: error: ')


def test_pretrain_under_torchrun(tmp_path, trained):
    "Two processes with Gloo: the same command, one checkpoint, one log."
    _, _, env = trained
    cli = shutil.which('llm-from-scratch')
    if cli is None:
        pytest.skip('the console script is not installed')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', cli, 'pretrain',
                        *TINY_RUN, '--steps', '3', '--out', str(tmp_path/'ddp'), '--sample-interval', '0'],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('saved ') == 1 and find_checkpoint(tmp_path/'ddp').name == 'step-00000003'
    assert json.loads((tmp_path/'ddp'/'step-00000003'/'config.json').read_text())['world_size'] == 2
