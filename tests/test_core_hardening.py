"Bad environments and bad files: tiktoken offline, missing packages, data files that are not UTF-8 or not JSON."
import json
import os
import subprocess
import sys

import pytest

from llm_from_scratch import core
from llm_from_scratch.core import DownloadError, FileFormatError, read_json, read_text

# A proxy on the loopback port 9 (discard) refuses every connection at once: the network is
# unreachable for tiktoken's downloads, and no traffic leaves this machine.
DEAD_PROXY = 'http://127.0.0.1:9'


def offline_env(cache_dir, **extra):
    "This environment with an empty tiktoken cache and every download sent to a dead proxy."
    env = {k: v for k, v in os.environ.items() if k.lower() not in ('no_proxy', 'all_proxy')}
    for k in ('HTTPS_PROXY', 'HTTP_PROXY', 'https_proxy', 'http_proxy'):
        env[k] = DEAD_PROXY
    env['TIKTOKEN_CACHE_DIR'] = str(cache_dir)
    env.update(extra)
    return env


def python(code, env=None):
    "Run `code` in a fresh interpreter (tiktoken caches encodings per process)."
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)


DOCTOR = 'import sys\n{}\nfrom llm_from_scratch.cli import main\nsys.exit(main(["doctor"]))'


def doctor(block='', env=None):
    "Run `llm-from-scratch doctor` in a fresh interpreter, after `block` (e.g. hiding a package)."
    return python(DOCTOR.format(block), env=env)


def line(out, start):
    "The report line for `start`."
    found = [x for x in out.splitlines() if x.startswith(start)]
    assert found, f'no line starting with {start!r} in:\n{out}'
    return found[0]


# --- 1. tiktoken's GPT-2 files ------------------------------------------------------------

def test_gpt2_tokenizer_is_tiktokens_gpt2():
    tok = core.gpt2_tokenizer()
    assert tok.name == 'gpt2' and tok.n_vocab == 50257
    assert tok.encode('Hello, world') == [15496, 11, 995]


def test_gpt2_tokenizer_offline_names_tiktoken_cache_dir(tmp_path):
    code = ('from llm_from_scratch.core import gpt2_tokenizer, DownloadError\n'
            'try:\n    gpt2_tokenizer()\nexcept DownloadError as e:\n    print(e); raise SystemExit(3)\n')
    r = python(code, env=offline_env(tmp_path))
    assert r.returncode == 3, r.stdout + r.stderr
    msg = r.stdout.strip()
    assert len(msg.splitlines()) == 1, msg
    assert 'TIKTOKEN_CACHE_DIR' in msg and str(tmp_path) in msg and 'llm-from-scratch doctor' in msg
    assert 'encoder.json' in msg and 'vocab.bpe' in msg
    assert list(tmp_path.iterdir()) == [], 'nothing may be left in the cache folder'


def test_gpt2_tokenizer_error_is_the_packages_download_error(tmp_path, monkeypatch):
    "In-process, with tiktoken made to fail as it does offline."
    import tiktoken

    def offline(name):
        raise OSError('Unable to connect to proxy')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path))
    with pytest.raises(DownloadError, match='TIKTOKEN_CACHE_DIR'):
        core.gpt2_tokenizer()


def test_doctor_fails_without_tiktoken_files(tmp_path):
    r = doctor(env=offline_env(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    got = line(r.stdout, 'tiktoken: gpt2')
    assert ' FAIL ' in got and 'TIKTOKEN_CACHE_DIR' in got, got
    assert 'Traceback' not in r.stderr


def test_doctor_finds_tiktoken_files():
    r = doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    got = line(r.stdout, 'tiktoken: gpt2')
    assert ' OK ' in got and os.environ['TIKTOKEN_CACHE_DIR'] in got, got


def test_tiktoken_check_with_corrupt_cached_file(tmp_path, monkeypatch):
    "A cached file with the wrong content is not taken for a good one."
    src = os.environ['TIKTOKEN_CACHE_DIR']
    for p in os.listdir(src):
        (tmp_path/p).write_bytes(b'not it')
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path))
    monkeypatch.setattr(core, 'gpt2_tokenizer', lambda: (_ for _ in ()).throw(DownloadError('offline')))
    c = core._tiktoken_check()
    assert c.status == 'FAIL' and 'offline' in c.detail


# --- 2. every declared dependency ----------------------------------------------------------

def test_doctor_fails_when_pandas_cannot_be_imported():
    r = doctor("sys.modules['pandas'] = None  # import pandas now fails")
    assert r.returncode == 1, r.stdout + r.stderr
    got = line(r.stdout, 'pandas ')
    assert ' FAIL ' in got and 'finetune-classifier' in got and 'pip install' in got, got


def test_report_fails_when_a_serve_dependency_cannot_be_imported():
    "The report itself (the CLI imports serve's module to build its parser, so it is checked through core)."
    code = ("import sys\nsys.modules['uvicorn'] = None\n"
            "from llm_from_scratch.core import print_environment_report\n"
            "sys.exit(0 if print_environment_report() else 1)")
    r = python(code)
    assert r.returncode == 1, r.stdout + r.stderr
    got = line(r.stdout, 'uvicorn ')
    assert ' FAIL ' in got and 'serve will not work' in got, got


def test_doctor_reports_missing_tensorflow_as_optional():
    r = doctor("sys.modules['tensorflow'] = None")
    assert r.returncode == 0, r.stdout + r.stderr
    got = line(r.stdout, 'tensorflow ')
    assert ' INFO ' in got and 'optional' in got and "llm-from-scratch[tf]" in got, got


def test_doctor_lists_every_declared_requirement():
    import importlib.metadata
    r = doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        reqs = importlib.metadata.requires('llm-from-scratch') or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('the package is not installed: no metadata to compare with')
    names = {core._split_requirement(r)[0] for r in reqs if 'extra == "dev"' not in r.replace("'", '"')}
    assert names >= {'pandas', 'starlette', 'uvicorn', 'tensorflow'}
    for name in names:
        got = line(r.stdout, f'{name} ')
        assert (' OK ' in got) or (name == 'tensorflow' and ' INFO ' in got), got


def test_too_old_version_fails(monkeypatch):
    monkeypatch.setattr(core, '_requirements', lambda: [('pandas', [('>=', '99.0')], None),
                                                        ('numpy', [('<', '1.0')], None)])
    checks = {c.what: c for c in core._package_checks()}
    assert checks['pandas'].status == 'FAIL' and 'needs >=99.0' in checks['pandas'].detail
    assert checks['numpy'].status == 'FAIL' and 'needs <1.0' in checks['numpy'].detail


def test_fallback_requirements_match_settings_ini():
    "Without metadata the report falls back to these names: they must stay settings.ini's requirements."
    import configparser
    from pathlib import Path
    ini = configparser.ConfigParser()
    ini.read(Path(__file__).parents[1]/'settings.ini')
    names = [core._split_requirement(r)[0] for r in ini['DEFAULT']['requirements'].split()]
    assert list(core._FALLBACK_REQUIREMENTS) == names


def test_requirements_without_metadata(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, 'requires', missing)
    assert [r[0] for r in core._requirements()] == list(core._FALLBACK_REQUIREMENTS)


def test_split_requirement():
    assert core._split_requirement('fastcore<2,>=1.12.27') == ('fastcore', [('<', '2'), ('>=', '1.12.27')], None)
    assert core._split_requirement('tensorflow>=2.15; extra == "tf"') == ('tensorflow', [('>=', '2.15')], 'tf')
    assert core._split_requirement('torch') == ('torch', [], None)


# --- 3. data files that are not UTF-8 or not JSON -----------------------------------------

def test_read_json_names_file_line_and_column(tmp_path):
    p = tmp_path/'entries.json'
    p.write_text('[\n  {"a": 1},\n  {"b": 2,}\n]\n', encoding='utf-8')
    with pytest.raises(FileFormatError) as e:
        read_json(p, what='instruction data')
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and len(msg.splitlines()) == 1
    assert str(p) in msg and 'instruction data' in msg and 'line 3, column' in msg, msg


def test_read_text_names_file_and_byte_offset(tmp_path):
    p = tmp_path/'latin1.txt'
    p.write_bytes('first line\ncaf\u00e9\n'.encode('latin-1'))
    with pytest.raises(FileFormatError) as e:
        read_text(p)
    msg = str(e.value)
    assert str(p) in msg and 'UTF-8' in msg and 'byte 14' in msg and 'line 2' in msg and '0xe9' in msg, msg


def test_read_text_accepts_bom_and_windows_line_ends(tmp_path):
    p = tmp_path/'bom.txt'
    p.write_bytes(b'\xef\xbb\xbfham\tone\r\nspam\ttwo\r')
    assert read_text(p) == 'ham\tone\nspam\ttwo\n'
    q = tmp_path/'bom.json'
    q.write_bytes(b'\xef\xbb\xbf[1, 2]')
    assert read_json(q) == [1, 2]


def test_read_json_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path/'nope.json')


ENTRY = {'instruction': 'Say hi', 'input': '', 'output': 'hi'}
PREF = {'instruction': 'Say hi', 'input': '', 'output': 'hi', 'chosen': 'Hi!', 'rejected': 'no'}


@pytest.mark.parametrize('content,expect', [
    (b'[{"instruction": "Say hi", "output": "hi",}]', 'line 1, column'),
    ('[{"instruction": "Sag hall\u00f6", "output": "hi"}]'.encode('latin-1'), 'not valid UTF-8'),
])
def test_instruction_data_errors_name_the_file(tmp_path, content, expect):
    from llm_from_scratch.instruct import download_and_load_file
    p = tmp_path/'mine.json'
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        download_and_load_file(p)
    assert str(p) in str(e.value) and expect in str(e.value), str(e.value)
    p.write_text(json.dumps([ENTRY]), encoding='utf-8')
    assert download_and_load_file(p) == [ENTRY]


@pytest.mark.parametrize('content,expect', [
    (b'[{"instruction": "x"\n "chosen": "a"}]', 'line 2, column'),
    (b'[{"instruction": "\xff"}]', 'byte 18'),
])
def test_preference_data_errors_name_the_file(tmp_path, content, expect):
    from llm_from_scratch.dpo import load_preference_data
    p = tmp_path/'prefs.json'
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_preference_data(p)
    assert str(p) in str(e.value) and expect in str(e.value), str(e.value)
    p.write_text(json.dumps([PREF]), encoding='utf-8')
    assert load_preference_data(p) == [PREF]


def test_classifier_tsv_not_utf8_names_the_file(tmp_path):
    from llm_from_scratch.classify import read_labeled_tsv
    p = tmp_path/'data.tsv'
    p.write_bytes('ham\tok\nspam\tgagnez un caf\u00e9\n'.encode('cp1252'))
    with pytest.raises(ValueError) as e:
        read_labeled_tsv(p)
    msg = str(e.value)
    assert str(p) in msg and 'UTF-8' in msg and 'line 2' in msg, msg
