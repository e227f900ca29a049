"""The server under bad inputs and faults: clients that leave, hostile bodies, conversations longer than the context, and
shutdown by signal. Every test talks to a real uvicorn server on 127.0.0.1."""
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tiktoken
import torch

from tiny_models import SlowModel, unit_scale

from llm_from_scratch.gpt import GPTModel, generate_text_simple
from llm_from_scratch.serve import CHAT_PAGE, BackgroundServer, create_app, fit_messages, messages_to_prompt
from llm_from_scratch.trainer import MODEL_CONFIGS

ROOT = Path(__file__).resolve().parent.parent
NAME = 'tiny-gpt'
EOT = 50256
GPT2 = tiktoken.get_encoding('gpt2')
ROUTES = ['/api/chat', '/api/generate', '/v1/chat/completions']


def tiny_gpt(context_length=128, seed=123):
    "A tiny random GPT whose end-of-text logit is always 0, so that greedy decoding never ends early."
    torch.manual_seed(seed)
    model = unit_scale(GPTModel({**MODEL_CONFIGS['gpt-small-test'], 'context_length': context_length}).eval(), seed)
    with torch.no_grad():
        model.out_head.weight[EOT] = 0
    return model


class CountingModel(SlowModel):
    "A `SlowModel` that counts its forward passes: one per decoding step."
    def __init__(self, inner, delay=0.03):
        super().__init__(inner, delay)
        self.calls = 0

    def forward(self, idx, cache=None):
        self.calls += 1
        return super().forward(idx, cache)


@pytest.fixture(scope='module')
def model():
    return tiny_gpt()


@pytest.fixture(scope='module')
def server(model):
    with BackgroundServer(create_app(model, GPT2, NAME, max_tokens=4)) as s:
        yield s


def request_body(route, n_tokens, stream, text='Hi'):
    "A request of n_tokens new tokens in the route's protocol."
    if route == '/v1/chat/completions':
        return {'model': NAME, 'stream': stream, 'max_tokens': n_tokens, 'messages': [{'role': 'user', 'content': text}]}
    body = {'model': NAME, 'stream': stream, 'options': {'num_predict': n_tokens}}
    return {**body, 'messages': [{'role': 'user', 'content': text}]} if route == '/api/chat' else {**body, 'prompt': text}


def post_json(url, body=None, raw=None, timeout=60):
    "(status, headers, parsed JSON body), for errors too."
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method='POST', headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def error_message(route, body):
    "The error's message, checking that it has the route's protocol's shape."
    if route.startswith('/v1/'):
        assert body['error']['type'] == 'invalid_request_error' and isinstance(body['error']['message'], str), body
        return body['error']['message']
    assert set(body) == {'error'} and isinstance(body['error'], str), body
    return body['error']


def open_request(port, route, head_lines=(), body=b''):
    "A socket that has sent a POST's head (and maybe part of its body), for tests that hang up or send slowly."
    sock = socket.create_connection(('127.0.0.1', port), timeout=30)
    head = [f'POST {route} HTTP/1.1', f'Host: 127.0.0.1:{port}', 'Content-Type: application/json', *head_lines]
    sock.sendall(('\r\n'.join(head) + '\r\n\r\n').encode() + body)
    return sock


def read_response(sock):
    "(status, parsed JSON body) of the response on sock."
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, json.loads(r.read())


def wait_until(condition, seconds=60):
    "Poll condition() until it holds; a generous bound only guards against a hang."
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, 'timed out waiting'
        time.sleep(0.01)


@contextlib.contextmanager
def server_errors():
    "The ERROR records uvicorn logs meanwhile (its loggers do not propagate to pytest's caplog)."
    records, handler, logger = [], logging.Handler(logging.ERROR), logging.getLogger('uvicorn.error')
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# A client that disconnects from a non-streaming request

@pytest.mark.parametrize('route', ROUTES)
def test_non_streaming_disconnect_stops_generation(route):
    "A client that hangs up while a non-streamed reply is generated frees the model within a decoding step or so."
    model = CountingModel(tiny_gpt())
    app = create_app(model, GPT2, NAME, max_tokens_limit=1000)
    with BackgroundServer(app) as s, server_errors() as errors:
        body = json.dumps(request_body(route, 1000, stream=False)).encode()
        sock = open_request(s.port, route, [f'Content-Length: {len(body)}'], body)
        wait_until(lambda: model.calls >= 5)       # the generation is under way
        sock.close()
        at_close = model.calls
        status, _, answer = post_json(f'{s.url}{route}', request_body(route, 2, stream=False), timeout=120)
        total = model.calls
        s.stop()
    assert status == 200 and errors == []
    assert (answer['usage']['completion_tokens'] if route.startswith('/v1/') else answer['eval_count']) == 2
    # the 1000 steps of the first request would take 30 s; after the hang-up only a few more run, then the
    # second request's 2 (bounded generously: the event loop may notice the closed socket a few steps late)
    assert total - at_close < 30, (at_close, total)


def test_streaming_disconnect_while_queued_never_runs(server):
    "A streamed request whose client leaves while it waits behind another is skipped, not generated."
    model = CountingModel(tiny_gpt())
    with BackgroundServer(create_app(model, GPT2, NAME, max_tokens_limit=1000)) as s:
        first = json.dumps(request_body('/api/chat', 40, stream=False)).encode()
        busy = open_request(s.port, '/api/chat', [f'Content-Length: {len(first)}'], first)
        wait_until(lambda: model.calls >= 2)
        second = json.dumps(request_body('/api/chat', 1000, stream=True)).encode()
        queued = open_request(s.port, '/api/chat', [f'Content-Length: {len(second)}'], second)
        time.sleep(0.2)                            # let the server queue it behind the first
        queued.close()
        status, answer = read_response(busy)
        busy.close()
        assert status == 200 and answer['eval_count'] == 40
        status, _, answer = post_json(f'{s.url}/api/chat', request_body('/api/chat', 2, stream=False), timeout=120)
    assert status == 200 and model.calls < 40 + 2 + 30


# Hostile bodies

@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('raw', [b'[' * 100_000 + b']' * 100_000,
                                 b'{"model": "tiny-gpt", "messages": ' + b'[' * 100_000 + b']' * 100_000 + b'}'])
def test_deeply_nested_json_is_400(model, route, raw):
    # a server of its own (uvicorn's logging set-up replaces the handlers of a logger made before it)
    with BackgroundServer(create_app(model, GPT2, NAME, max_tokens=4)) as s, server_errors() as errors:
        status, _, body = post_json(f'{s.url}{route}', raw=raw)
        s.stop()                                    # whatever it logs, it has logged once it has stopped
    assert status == 400 and 'nested too deeply' in error_message(route, body)
    assert errors == []                             # and no traceback in the server's log


@pytest.mark.parametrize('route', ROUTES)
def test_body_over_the_limit_is_413_by_content_length(server, route):
    "A Content-Length over the limit (1 MiB by default) is refused before any of the body is read."
    sock = open_request(server.port, route, [f'Content-Length: {2 * 2**20}'])   # and no body at all
    with sock:
        status, body = read_response(sock)
    assert status == 413 and '1048576 bytes' in error_message(route, body)


@pytest.fixture(scope='module')
def small_limit_server():
    with BackgroundServer(create_app(tiny_gpt(), GPT2, NAME, max_tokens=2, max_body_bytes=1000)) as s:
        yield s


@pytest.mark.parametrize('route', ROUTES)
def test_chunked_body_over_the_limit_is_413(small_limit_server, route):
    "A chunked body has no length up front: it is refused as soon as it grows past the limit, before it ends."
    sock = open_request(small_limit_server.port, route, ['Transfer-Encoding: chunked'])
    with sock:
        for _ in range(2):                          # 1200 bytes of a body that never ends
            sock.sendall(b'258\r\n' + b' ' * 600 + b'\r\n')
        status, body = read_response(sock)
    assert status == 413 and '1000 bytes' in error_message(route, body)


@pytest.mark.parametrize('route', ROUTES)
def test_body_within_the_limit_is_served(small_limit_server, route):
    body = request_body(route, 2, stream=False)
    raw = json.dumps(body).encode()
    raw += b' ' * (1000 - len(raw))                 # exactly the limit
    status, _, answer = post_json(f'{small_limit_server.url}{route}', raw=raw)
    assert status == 200, answer
    chunked = open_request(small_limit_server.port, route, ['Transfer-Encoding: chunked'],
                           b'%x\r\n%s\r\n0\r\n\r\n' % (len(raw), raw))
    with chunked:
        status, answer = read_response(chunked)
    assert status == 200, answer


@pytest.mark.parametrize('options, word', [({'seed': 'x' * 100_000}, 'seed'), ({'num_predict': int('9' * 4000)}, 'num_predict'),
                                           ({'temperature': [[[[[[[[[[1]]]]]]]]]]}, 'temperature')])
def test_errors_quote_a_long_value_briefly(server, options, word):
    "An error message names the bad value in a few dozen characters, whatever its size."
    status, _, body = post_json(f'{server.url}/api/chat', {'model': NAME, 'messages': [{'role': 'user', 'content': 'Hi'}],
                                                           'options': options})
    assert status == 400 and word in body['error'] and '...' in body['error'] and len(body['error']) < 120, body


def test_create_app_checks_the_body_limit():
    for bad in (0, -1, 1.5, '1M'):
        with pytest.raises(ValueError, match='max_body_bytes'):
            create_app(tiny_gpt(), GPT2, max_body_bytes=bad)


# Conversations longer than the context

def alpaca(messages):
    return GPT2.encode(messages_to_prompt(messages))


TURNS = [{'role': 'system', 'content': 'Answer briefly.'}] + [
    {'role': role, 'content': f'{"Question" if role == "user" else "Answer"} number {i}: ' + 'word ' * 6}
    for i in range(6) for role in ('user', 'assistant')] + [{'role': 'user', 'content': 'And the last question?'}]


def test_fit_messages_keeps_everything_that_fits():
    kept, ids = fit_messages(TURNS, alpaca, 1000)
    assert kept == TURNS and ids == alpaca(TURNS)


@pytest.mark.parametrize('limit', [20, 53, 54, 60, 100, 130, 200])
def test_fit_messages_drops_the_oldest_turns(limit):
    kept, ids = fit_messages(TURNS, alpaca, limit)
    assert kept[0] == TURNS[0] and kept[-1] == TURNS[-1]          # the system message and the newest one stay
    assert kept[1]['role'] == 'user'                               # a kept turn starts with its question
    assert len(kept) < len(TURNS)
    assert kept[1:] == TURNS[len(TURNS) - len(kept) + 1:]          # the newest turns, in order
    assert ids == alpaca(kept) and len(ids) <= limit
    # one more turn (question and answer) would not have fit
    start = len(TURNS) - len(kept) + 1
    if start > 1:
        assert len(alpaca(TURNS[:1] + TURNS[start - 2:])) > limit


def test_fit_messages_refuses_a_newest_message_that_alone_is_too_long():
    assert len(alpaca([TURNS[0], TURNS[-1]])) == 20
    with pytest.raises(ValueError, match='newest message is too long.*context holds 19 tokens'):
        fit_messages(TURNS, alpaca, 19)
    with pytest.raises(ValueError, match='context holds 20 tokens'):
        fit_messages([{'role': 'user', 'content': 'Hi'}], alpaca, 20)


@pytest.fixture(scope='module')
def short_model():
    return tiny_gpt(context_length=100)


@pytest.fixture(scope='module')
def short_server(short_model):
    with BackgroundServer(create_app(short_model, GPT2, NAME, max_tokens=3)) as s:
        yield s


def greedy(model, ids, n):
    return GPT2.decode(generate_text_simple(model, torch.tensor([ids]), n, model.cfg['context_length'])[0, len(ids):].tolist())


def test_ollama_chat_keeps_the_newest_turns(short_server, short_model):
    kept, ids = fit_messages(TURNS, alpaca, 100)
    dropped = len(TURNS) - len(kept)
    assert dropped > 0 and len(alpaca(TURNS)) > 100
    status, headers, body = post_json(f'{short_server.url}/api/chat', {'model': NAME, 'messages': TURNS, 'stream': False})
    assert status == 200, body
    assert body['prompt_eval_count'] == len(ids) and body['message']['content'] == greedy(short_model, ids, 3)
    assert body['dropped_messages'] == dropped and headers['X-Dropped-Messages'] == str(dropped)
    # streamed: the header, and the count on the last line
    request = urllib.request.Request(f'{short_server.url}/api/chat', method='POST',
                                     data=json.dumps({'model': NAME, 'messages': TURNS}).encode())
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers['X-Dropped-Messages'] == str(dropped)
        lines = [json.loads(line) for line in r if line.strip()]
    assert lines[-1]['done'] and lines[-1]['dropped_messages'] == dropped
    assert ''.join(m['message']['content'] for m in lines) == body['message']['content']


def test_openai_chat_keeps_the_newest_turns(short_server, short_model):
    kept, ids = fit_messages(TURNS, alpaca, 100)
    dropped = len(TURNS) - len(kept)
    status, headers, body = post_json(f'{short_server.url}/v1/chat/completions', {'model': NAME, 'messages': TURNS})
    assert status == 200, body
    assert body['usage']['prompt_tokens'] == len(ids) and body['choices'][0]['message']['content'] == greedy(short_model, ids, 3)
    assert body['dropped_messages'] == dropped and headers['X-Dropped-Messages'] == str(dropped)
    request = urllib.request.Request(f'{short_server.url}/v1/chat/completions', method='POST',
                                     data=json.dumps({'model': NAME, 'messages': TURNS, 'stream': True}).encode())
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers['X-Dropped-Messages'] == str(dropped)
        events = [json.loads(e[6:]) for e in r.read().decode().split('\n\n') if e and e != 'data: [DONE]']
    last = [e for e in events if e['choices'] and e['choices'][0]['finish_reason']][-1]
    assert last['dropped_messages'] == dropped


def test_chat_that_fits_reports_nothing_dropped(short_server):
    status, headers, body = post_json(f'{short_server.url}/api/chat', {'model': NAME, 'stream': False,
                                                                      'messages': TURNS[-1:]})
    assert status == 200 and 'dropped_messages' not in body and headers['X-Dropped-Messages'] is None


@pytest.mark.parametrize('route', ['/api/chat', '/v1/chat/completions'])
def test_newest_message_too_long_is_still_400(short_server, route):
    messages = TURNS[:3] + [{'role': 'user', 'content': 'word ' * 150}]
    status, _, body = post_json(f'{short_server.url}{route}', {'model': NAME, 'messages': messages})
    message = error_message(route, body)
    assert status == 400 and 'context holds 100 tokens' in message, message


def test_chat_page_reads_the_dropped_count():
    assert 'X-Dropped-Messages' in CHAT_PAGE and 'no longer fit' in CHAT_PAGE


# The chat page's script, run by Node against a stub of the page and of fetch

PAGE_HARNESS = r"""
const elements = {};
function element(id) {
  if (!elements[id]) elements[id] = {id, value: "", disabled: false, children: [], dataset: {}, textContent: "",
    classList: {items: [], add(c) { this.items.push(c); }}, appendChild(c) { this.children.push(c); },
    replaceChildren() { this.children = []; }, addEventListener() {}, focus() {}, scrollIntoView() {},
    insertBefore(c, ref) { this.children.splice(this.children.indexOf(ref), 0, c); }};
  return elements[id];
}
globalThis.document = {getElementById: element, createElement: () => element("el" + Object.keys(elements).length)};
element("temperature").value = "0"; element("max-tokens").value = "5"; element("seed").value = "1";
const sent = [];
globalThis.fetch = async (url, init) => {
  sent.push(JSON.parse(init.body));
  const lines = JSON.stringify({message: {content: "ok"}, done: false}) + "\n" +
                JSON.stringify({message: {content: ""}, done: true, done_reason: "length"}) + "\n";
  let given = false;
  // the server drops messages of the second request only
  const dropped = sent.length === 2 ? DROPPED : null;
  return {ok: true, headers: {get: (h) => h.toLowerCase() === "x-dropped-messages" ? dropped : null},
          body: {getReader: () => ({read: async () => given ? {done: true} : (given = true,
                 {value: new TextEncoder().encode(lines), done: false})})}};
};
"""


def run_page(dropped):
    "Send three messages through the page's script; (the requests' messages, the page's bubbles as (class, text))."
    script = CHAT_PAGE.split('<script>')[1].split('</script>')[0].replace('__MODEL__', '"tiny-gpt"')
    driver = ('(async () => { await send("first"); await send("second"); await send("third");\n'
              'const texts = element("messages").children.map(c => [c.className, c.textContent]);\n'
              'console.log(JSON.stringify({sent: sent.map(b => b.messages), texts})); })();\n')
    node = subprocess.run(['node', '-e', f'const DROPPED = {json.dumps(dropped)};\n' + PAGE_HARNESS + script + driver],
                          capture_output=True, text=True, timeout=60)
    assert node.returncode == 0, node.stderr
    return json.loads(node.stdout)


@pytest.mark.skipif(shutil.which('node') is None, reason='Node.js is not installed')
def test_chat_page_notes_dropped_turns_and_forgets_them():
    user, ok = [{'role': 'user', 'content': t} for t in ('first', 'second', 'third')], {'role': 'assistant', 'content': 'ok'}
    out = run_page(None)
    assert out['sent'] == [user[:1], [user[0], ok, user[1]], [user[0], ok, user[1], ok, user[2]]]
    assert not any('note' in cls for cls, _ in out['texts'])
    # the server dropped the two oldest messages of the second request: the page says so and forgets them too
    out = run_page('2')
    assert out['sent'][2] == [user[1], ok, user[2]]
    notes = [(i, text) for i, (cls, text) in enumerate(out['texts']) if 'note' in cls]
    assert len(notes) == 1 and '2 earlier messages' in notes[0][1] and 'no longer fit' in notes[0][1]
    # the note stands before the second reply
    assert [cls for cls, _ in out['texts']][notes[0][0] + 1] == 'msg assistant'


# Shutdown by signal

SERVE = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
import tiktoken, torch
from tiny_models import SlowModel, unit_scale
from llm_from_scratch.gpt import GPTModel
from llm_from_scratch.serve import serve
from llm_from_scratch.trainer import MODEL_CONFIGS
torch.manual_seed(123)
model = unit_scale(GPTModel({{**MODEL_CONFIGS['gpt-small-test'], 'context_length': 128}}).eval(), 123)
with torch.no_grad():
    model.out_head.weight[{EOT}] = 0
serve(SlowModel(model, 0.05), tiktoken.get_encoding('gpt2'), '{NAME}', port=int(sys.argv[1]), log_level='info',
      max_tokens_limit=5000)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, '-c', SERVE, str(port)], env={**os.environ, 'PYTHONPATH': str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def up():
        assert proc.poll() is None, proc.communicate()
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/tags', timeout=2):
                return True
        except OSError:
            return False
    wait_until(up, 90)
    return proc, port


@pytest.mark.parametrize('sig, stream', [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=['SIGINT-streamed', 'SIGTERM-whole'])
def test_signal_stops_the_server_promptly_without_a_traceback(sig, stream):
    "Ctrl+C (or SIGTERM) with a 5000-token reply in flight: the reply ends within a few tokens and the server exits."
    proc, port = _start_server()
    lines, finished = [], threading.Event()

    def client():
        body = request_body('/api/chat', 5000, stream=stream)
        request = urllib.request.Request(f'http://127.0.0.1:{port}/api/chat', data=json.dumps(body).encode(), method='POST')
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                for line in r:
                    if line.strip():
                        lines.append(json.loads(line))
        except OSError as e:
            lines.append({'client_error': repr(e)})
        finally:
            finished.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        if stream:
            wait_until(lambda: len(lines) >= 3)         # tokens are streaming
            seen = len(lines)
        else:
            time.sleep(1.0)                             # about 20 of the 5000 tokens
            seen = 20
        proc.send_signal(sig)
        # generous: a prompt shutdown takes well under a second; 5000 tokens at 50 ms would take 250 s
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert finished.wait(60)
    assert proc.returncode == 0, err
    assert 'Traceback' not in err and 'Traceback' not in out, err
    assert 'stopped serving' in out
    # the reply in flight ended properly, after a few more tokens, not 5000
    last = lines[-1]
    assert last.get('done') is True, lines[-3:]
    assert last['done_reason'] == 'cancel' and last['eval_count'] < seen + 100, last


# ---- sampling settings: one check for every entry point, sampling safe for every accepted value ----
def with_sampling(route, temperature, top_k=None, stream=False):
    body = request_body(route, 3, stream)
    opts = {'temperature': temperature, **({'top_k': top_k} if top_k is not None else {})}
    if route == '/v1/chat/completions':
        return {**body, **opts}
    return {**body, 'options': {**body['options'], **opts}}


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('temperature,top_k', [(1e-45, None), (5e-324, 5), (1e308, 5), (1e308, None)])
def test_extreme_temperatures_generate(server, route, temperature, top_k):
    "Temperatures the check accepts sample safely (they used to answer 500: nan probabilities)."
    status, _, body = post_json(server.url + route, with_sampling(route, temperature, top_k))
    assert status == 200, body


@pytest.mark.parametrize('route', ROUTES)
def test_extreme_temperature_streams_without_an_error_line(server, route):
    "Streaming with an extreme temperature answers 200 and no error part (it used to send an error line after 200)."
    data = json.dumps(with_sampling(route, 1e308, 5, stream=True)).encode()
    request = urllib.request.Request(server.url + route, data=data, method='POST',
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status == 200
        text = r.read().decode()
    assert '"error"' not in text, text


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('temperature', ['nan', -1, True, '0.5'])
def test_bad_temperatures_are_400(server, route, temperature):
    value = float('nan') if temperature == 'nan' else temperature
    raw = json.dumps(with_sampling(route, 0.0)).replace('"temperature": 0.0', '"temperature": ' + json.dumps(value))
    status, _, body = post_json(server.url + route, raw=raw.replace('NaN', 'NaN').encode())
    assert status == 400 and 'temperature' in json.dumps(body), (status, body)
