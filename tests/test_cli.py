"The `llm-from-scratch` console script, run as a user runs it."
import shutil
import subprocess
import sys

import pytest


def run(*args, env=None):
    exe = shutil.which('llm-from-scratch')
    cmd = [exe, *args] if exe else [sys.executable, '-c', 'import sys; from llm_from_scratch.cli import main; sys.exit(main())', *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_doctor_reports_ok():
    r = run('doctor')
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith('torch') and ' OK ' in line for line in lines)
    assert any(line.startswith('device') for line in lines)
    assert any(line.startswith('data: the-verdict') for line in lines)


def test_doctor_fails_on_corrupt_data(tmp_path):
    import os
    (tmp_path/'the-verdict.txt').write_text('not the verdict')
    env = dict(os.environ, LLM_FROM_SCRATCH_DATA=str(tmp_path))
    r = run('doctor', env=env)
    assert r.returncode == 1
    assert any(line.startswith('data: the-verdict') and 'FAIL' in line for line in r.stdout.splitlines())


@pytest.mark.parametrize('args', [[], ['no-such-command']])
def test_usage_errors_exit_non_zero(args):
    r = run(*args)
    assert r.returncode == 2
    assert 'Traceback' not in r.stderr
