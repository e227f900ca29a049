"Shared test set-up: offline data folders and a throw-away cache, whatever the caller's environment."
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent/'shared'/'data'

# The book's data files come from ../shared/data (no network in CI); `.ci/run` sets the same values.
if SHARED_DATA.is_dir():
    os.environ.setdefault('LLM_FROM_SCRATCH_DATA', str(SHARED_DATA))
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(SHARED_DATA/'tiktoken_cache'))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')


def pytest_configure(config):
    for name, what in [('slow', 'long training runs'), ('net', 'real downloads'), ('gpu', 'needs CUDA')]:
        config.addinivalue_line('markers', f'{name}: {what} (not run in CI)')


def pytest_collection_modifyitems(config, items):
    "Skip `slow`, `net` and `gpu` tests unless LLM_FROM_SCRATCH_TEST_FLAGS names them (e.g. 'slow net')."
    wanted = set(os.environ.get('LLM_FROM_SCRATCH_TEST_FLAGS', '').split())
    for item in items:
        for flag in ('slow', 'net', 'gpu'):
            if flag in item.keywords and flag not in wanted:
                item.add_marker(pytest.mark.skip(reason=f'{flag} test: set LLM_FROM_SCRATCH_TEST_FLAGS="{flag}" to run it'))


@pytest.fixture(autouse=True)
def _fresh_home(tmp_path, monkeypatch):
    "Each test writes downloads and checkpoints to its own temporary LLM_FROM_SCRATCH_HOME."
    monkeypatch.setenv('LLM_FROM_SCRATCH_HOME', str(tmp_path/'home'))


def shared_data() -> Path:
    "The folder of the book's data files; tests that need it skip with a reason where it is missing."
    if not SHARED_DATA.is_dir():
        pytest.skip(f'{SHARED_DATA} (the book\'s data files) is not present')
    return SHARED_DATA
