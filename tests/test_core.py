"The download registry against a real HTTP server on 127.0.0.1, and the other core utilities."
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from llm_from_scratch import core
from llm_from_scratch.core import ChecksumError, DataFile, DownloadError, atomic_write, download, get_device, set_seed

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    "Serves /good (the payload), /short (promises more bytes than it sends), /missing (404)."
    hits = []

    def do_GET(self):
        Handler.hits.append(self.path)
        if self.path == '/good':
            self.send_response(200)
            self.send_header('Content-Length', str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == '/short':
            self.send_response(200)
            self.send_header('Content-Length', str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:100_000])  # the connection drops here
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_prefetched(monkeypatch):
    "These tests control where files come from: no pre-fetched folder unless a test sets one."
    monkeypatch.delenv('LLM_FROM_SCRATCH_DATA', raising=False)
    core._verified.clear()


def entry(urls, sha=SHA, name='payload', size=None):
    return DataFile(name, f'sub/{name}.bin', tuple(urls), sha, size)


def leftovers(home: Path):
    return sorted(str(p.relative_to(home)) for p in home.rglob('*') if p.is_file()) if home.exists() else []


def test_downloads_verifies_and_caches(server, tmp_path):
    Handler.hits.clear()
    p = download(entry([f'{server}/good']), quiet=True)
    assert p == core.data_home()/'data'/'sub'/'payload.bin'
    assert p.read_bytes() == PAYLOAD
    assert leftovers(core.data_home()) == ['data/sub/payload.bin'], 'no temporary files may remain'
    assert download(entry([f'{server}/good']), quiet=True) == p
    assert Handler.hits == ['/good'], 'a cached, verified file must not be fetched again'


def test_falls_back_to_mirror(server):
    Handler.hits.clear()
    p = download(entry([f'{server}/missing', f'{server}/good']), quiet=True)
    assert p.read_bytes() == PAYLOAD
    assert Handler.hits == ['/missing', '/good']


def test_interrupted_transfer_leaves_nothing(server):
    with pytest.raises(DownloadError, match='stopped after|IncompleteRead|incomplete|Connection'):
        download(entry([f'{server}/short']), quiet=True)
    assert leftovers(core.data_home()) == []


def test_wrong_checksum_leaves_nothing(server):
    with pytest.raises(ChecksumError, match='should have 0000'):
        download(entry([f'{server}/good'], sha='0' * 64), quiet=True)
    assert leftovers(core.data_home()) == []


def test_offline_error_names_url_file_and_folder():
    url = 'http://127.0.0.1:9/nothing-listens-here'
    with pytest.raises(DownloadError) as e:
        download(entry([url]), quiet=True, timeout=2)
    msg = str(e.value)
    assert url in msg and 'payload.bin' in msg and str(core.data_home()/'data') in msg and 'LLM_FROM_SCRATCH_DATA' in msg


def test_prefetched_folder_comes_first(tmp_path, monkeypatch):
    pre = tmp_path/'pre'
    (pre/'sub').mkdir(parents=True)
    (pre/'sub'/'payload.bin').write_bytes(PAYLOAD)
    monkeypatch.setenv('LLM_FROM_SCRATCH_DATA', str(pre))
    assert download(entry(['http://127.0.0.1:9/unused']), quiet=True) == pre/'sub'/'payload.bin'
    assert leftovers(core.data_home()) == [], 'a pre-fetched file is used in place, not copied'


def test_corrupt_prefetched_file_is_an_error_not_replaced(tmp_path, monkeypatch):
    pre = tmp_path/'pre'
    (pre/'sub').mkdir(parents=True)
    (pre/'sub'/'payload.bin').write_bytes(b'not it')
    monkeypatch.setenv('LLM_FROM_SCRATCH_DATA', str(pre))
    with pytest.raises(ChecksumError, match='payload.bin'):
        download(entry(['http://127.0.0.1:9/unused']), quiet=True)
    assert (pre/'sub'/'payload.bin').read_bytes() == b'not it'


def test_corrupt_cached_file_is_fetched_again(server):
    dest = core.data_home()/'data'/'sub'/'payload.bin'
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD[:10])
    assert download(entry([f'{server}/good']), quiet=True).read_bytes() == PAYLOAD


def test_size_mismatch_is_reported(tmp_path, monkeypatch):
    pre = tmp_path/'pre'
    (pre/'sub').mkdir(parents=True)
    (pre/'sub'/'payload.bin').write_bytes(PAYLOAD)
    monkeypatch.setenv('LLM_FROM_SCRATCH_DATA', str(pre))
    with pytest.raises(ChecksumError, match='bytes'):
        download(entry(['http://127.0.0.1:9/unused'], size=len(PAYLOAD) + 1), quiet=True)


def test_unknown_name():
    with pytest.raises(ValueError, match='Known names'):
        download('no-such-file')


def test_registry_files_in_shared_data(monkeypatch):
    "Every registered book file in the shared data folder matches its checksum."
    from conftest import shared_data
    monkeypatch.setenv('LLM_FROM_SCRATCH_DATA', str(shared_data()))
    for name in ['the-verdict', 'gpt2-encoder', 'gpt2-vocab', 'sms-spam', 'instruction-data', 'preference-data', 'tinyshakespeare']:
        assert download(name).parent == shared_data()


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path/'ckpt.bin'
    with atomic_write(p) as f:
        f.write(b'v1')
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write(b'v2-partial')
            raise RuntimeError('disk full')
    assert p.read_bytes() == b'v1'
    assert [q.name for q in tmp_path.iterdir()] == ['ckpt.bin']


def test_get_device(monkeypatch):
    monkeypatch.setenv('LLM_FROM_SCRATCH_DEVICE', 'cpu')
    assert get_device() == torch.device('cpu')
    assert get_device('cpu') == torch.device('cpu')
    with pytest.raises(ValueError, match='Unknown device'):
        get_device('quantum')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            get_device('cuda')
    monkeypatch.delenv('LLM_FROM_SCRATCH_DEVICE')
    expected = 'cuda' if torch.cuda.is_available() else ('mps' if torch.backends.mps.is_available() else 'cpu')
    assert get_device().type == expected


def test_set_seed_repeats_torch_numpy_and_random():
    import random

    import numpy as np
    set_seed(7)
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_seed(7)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
