"The HTTP server end to end: a real uvicorn server on 127.0.0.1, clients speaking Ollama's and OpenAI's protocols."
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tiktoken
import torch
from torch import nn

from tiny_models import SlowModel, unit_scale

from llm_from_scratch.gpt import GPTModel, generate_text_simple
from llm_from_scratch.generation import generate
from llm_from_scratch.serve import (BackgroundServer, ChatTokenizer, TextDecoder, add_cli_parser, cmd_serve, create_app,
                                    messages_to_prompt)
from llm_from_scratch.trainer import MODEL_CONFIGS, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CFG = {**MODEL_CONFIGS['gpt-small-test'], 'context_length': 128}
NAME = 'tiny-gpt'
EOT = 50256
GPT2 = tiktoken.get_encoding('gpt2')


def tiny_gpt(seed=123):
    "A tiny random GPT whose end-of-text logit is always 0, so greedy decoding never ends early (the max of 50k logits is > 0)."
    torch.manual_seed(seed)
    model = unit_scale(GPTModel(CFG).eval(), seed)
    with torch.no_grad():
        model.out_head.weight[EOT] = 0
    return model


@pytest.fixture(scope='module')
def model():
    return tiny_gpt()


@pytest.fixture(scope='module')
def server(model):
    with BackgroundServer(create_app(model, GPT2, NAME, max_tokens=16)) as s:
        yield s


def reference(model, ids, n, stop=(EOT,)):
    "The book's uncached greedy generation (chapter 4), cut at the first stop id: (text, number of tokens)."
    out = generate_text_simple(model, torch.tensor([ids]), n, model.cfg['context_length'])[0, len(ids):].tolist()
    for i, t in enumerate(out):
        if t in stop:
            out = out[:i]
            break
    return GPT2.decode(out), len(out)


def chat_ids(text):
    return GPT2.encode(messages_to_prompt([{'role': 'user', 'content': text}]))


def post(url, body, raw=None, timeout=60):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method='POST', headers={'Content-Type': 'application/json'})
    return urllib.request.urlopen(request, timeout=timeout)


def post_json(url, body=None, raw=None):
    "(status, parsed JSON body), for errors too."
    try:
        with post(url, body, raw) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def query_model(prompt, model=NAME, url='http://localhost:11434/api/chat', options=None):
    "Chapter 7's client: post one user message, read the streamed JSON lines, join the contents. Returns (text, lines)."
    data = {'model': model, 'messages': [{'role': 'user', 'content': prompt}],
            'options': options if options is not None else {'seed': 123, 'temperature': 0, 'num_ctx': 2048}}
    lines = []
    with post(url, data) as response:
        assert response.headers['Content-Type'].startswith('application/x-ndjson')
        while line := response.readline().decode('utf-8'):
            if line.strip():
                lines.append(json.loads(line))
    return ''.join(m['message']['content'] for m in lines), lines


def test_query_model_streams_ollama_chat(server, model):
    text, lines = query_model('What is the capital of France?', url=f'{server.url}/api/chat')
    expected, n = reference(model, chat_ids('What is the capital of France?'), 16)
    assert text == expected and n == 16
    assert len(lines) > 2 and all(not m['done'] for m in lines[:-1])
    last = lines[-1]
    assert last['done'] is True and last['done_reason'] == 'length' and last['message'] == {'role': 'assistant', 'content': ''}
    assert last['eval_count'] == 16 and last['prompt_eval_count'] == len(chat_ids('What is the capital of France?'))
    assert {'model', 'created_at', 'total_duration', 'prompt_eval_duration', 'eval_duration'} <= set(last)
    assert last['model'] == NAME and last['created_at'].endswith('Z')


def test_package_query_model_if_present(server, model):
    "Chapter 7's own `query_model` (llm_from_scratch.instruct), where that chapter exists, gets the same reply."
    instruct = pytest.importorskip('llm_from_scratch.instruct')
    if not hasattr(instruct, 'query_model'):
        pytest.skip('llm_from_scratch.instruct has no query_model yet')
    reply = instruct.query_model('Hi there', model=NAME, url=f'{server.url}/api/chat')
    assert reply == reference(model, chat_ids('Hi there'), 16)[0]


def test_alpaca_prompt_matches_chapter_7():
    instruct = pytest.importorskip('llm_from_scratch.instruct')
    entry = {'instruction': 'Rewrite the sentence.', 'input': ''}
    assert messages_to_prompt([{'role': 'user', 'content': entry['instruction']}]) == instruct.format_input(entry) + '\n\n### Response:\n'


def test_ollama_non_streaming_chat_and_generate(server, model):
    status, body = post_json(f'{server.url}/api/chat', {'model': NAME, 'stream': False, 'options': {'num_predict': 7},
                                                         'messages': [{'role': 'user', 'content': 'Hello'}]})
    assert status == 200 and body['done'] and body['eval_count'] == 7
    assert body['message'] == {'role': 'assistant', 'content': reference(model, chat_ids('Hello'), 7)[0]}
    # /api/generate continues a GPT's prompt as written (chapter 5's generate)
    status, body = post_json(f'{server.url}/api/generate', {'model': f'{NAME}:latest', 'prompt': 'Every effort moves you',
                                                             'stream': False, 'options': {'num_predict': 9}})
    assert status == 200 and body['done'] and body['done_reason'] == 'length' and body['eval_count'] == 9
    assert body['response'] == reference(model, GPT2.encode('Every effort moves you'), 9)[0]
    assert body['prompt_eval_count'] == 4
    # streamed: JSON lines with "response"
    with post(f'{server.url}/api/generate', {'model': NAME, 'prompt': 'Every effort moves you', 'options': {'num_predict': 9}}) as r:
        lines = [json.loads(x) for x in r if x.strip()]
    assert ''.join(m['response'] for m in lines) == body['response'] and lines[-1]['done']


def test_empty_request_answers_loaded(server):
    status, body = post_json(f'{server.url}/api/chat', {'model': NAME, 'messages': []})
    assert status == 200 and body['done'] and body['done_reason'] == 'load'


def test_tags_models_and_page(server):
    with urllib.request.urlopen(f'{server.url}/api/tags') as r:
        tags = json.loads(r.read())
    assert [m['name'] for m in tags['models']] == [NAME]
    assert tags['models'][0]['details']['family'] == 'GPTModel'
    with urllib.request.urlopen(f'{server.url}/v1/models') as r:
        models = json.loads(r.read())
    assert models['object'] == 'list' and [m['id'] for m in models['data']] == [NAME]
    with urllib.request.urlopen(f'{server.url}/') as r:
        page = r.read().decode()
        assert r.headers['Content-Type'].startswith('text/html')
    assert 'const MODEL = "tiny-gpt";' in page and '/api/chat' in page


def test_page_escapes_model_name(model):
    app = create_app(model, GPT2, '</script><b>x')
    from starlette.testclient import TestClient
    with TestClient(app) as client:
        page = client.get('/').text
    assert '</script><b>' not in page
    assert '&lt;/script&gt;&lt;b&gt;x' in page and '"\\u003c/script>\\u003cb>x"' in page


def openai_client(server):
    openai = pytest.importorskip('openai')
    return openai, openai.OpenAI(base_url=f'{server.url}/v1', api_key='x', max_retries=0, timeout=60)


def test_openai_client(server, model):
    openai, client = openai_client(server)
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello'}]
    ids = GPT2.encode(messages_to_prompt(messages))
    expected, _ = reference(model, ids, 6)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    assert r.object == 'chat.completion' and r.model == NAME
    assert r.choices[0].message.role == 'assistant' and r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == 'length'
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 6, len(ids) + 6)
    # streamed: server-sent events, the first delta carries the role, the last chunk the finish reason, then usage
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={'include_usage': True}))
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == 'length'
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [m.id for m in client.models.list()] == [NAME]
    # max_completion_tokens, the newer name, works too
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=2)
    assert r.usage.completion_tokens == 2


def test_openai_stream_is_sse(server):
    with post(f'{server.url}/v1/chat/completions', {'model': NAME, 'stream': True, 'max_tokens': 3,
                                                    'messages': [{'role': 'user', 'content': 'Hi'}]}) as r:
        assert r.headers['Content-Type'].startswith('text/event-stream')
        raw = r.read().decode()
    events = [e for e in raw.split('\n\n') if e]
    assert all(e.startswith('data: ') for e in events) and events[-1] == 'data: [DONE]'
    assert all(json.loads(e[6:])['object'] == 'chat.completion.chunk' for e in events[:-1])


def test_openai_errors(server):
    openai, client = openai_client(server)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model='gpt-4o', messages=[{'role': 'user', 'content': 'Hi'}])
    with pytest.raises(openai.BadRequestError, match='temperature'):
        client.chat.completions.create(model=NAME, messages=[{'role': 'user', 'content': 'Hi'}], temperature=-1)
    with pytest.raises(openai.BadRequestError, match='n must be 1'):
        client.chat.completions.create(model=NAME, messages=[{'role': 'user', 'content': 'Hi'}], n=2)
    status, body = post_json(f'{server.url}/v1/chat/completions', raw=b'{"model": ')
    assert status == 400 and 'invalid JSON' in body['error']['message'] and body['error']['type'] == 'invalid_request_error'


@pytest.mark.parametrize('raw', [b'{"model": "tiny-gpt", "messages": [', b'not json at all', b'', b'\xff\xfe', b'[1, 2]', b'"text"'])
@pytest.mark.parametrize('route', ['/api/chat', '/api/generate'])
def test_malformed_json_is_400(server, route, raw):
    status, body = post_json(f'{server.url}{route}', raw=raw)
    assert status == 400
    assert 'invalid JSON' in body['error'] or 'must be a JSON object' in body['error']


@pytest.mark.parametrize('route', ['/api/chat', '/api/generate'])
def test_unknown_model_is_404(server, route):
    status, body = post_json(f'{server.url}{route}', {'model': 'llama3', 'prompt': 'Hi', 'messages': [{'role': 'user', 'content': 'Hi'}]})
    assert status == 404 and 'llama3' in body['error'] and NAME in body['error']
    status, body = post_json(f'{server.url}{route}', {'prompt': 'Hi', 'messages': [{'role': 'user', 'content': 'Hi'}]})
    assert status == 400 and 'model is required' in body['error']


def test_prompt_beyond_context_is_400(server):
    long = 'word ' * 200
    for route, body in [('/api/chat', {'messages': [{'role': 'user', 'content': long}]}), ('/api/generate', {'prompt': long}),
                        ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': long}]})]:
        status, answer = post_json(f'{server.url}{route}', {'model': NAME, **body})
        message = answer['error'] if isinstance(answer['error'], str) else answer['error']['message']
        assert status == 400 and 'context holds 128 tokens' in message, message
    # exactly the context is fine: the book's generate slides its window past it
    ids = GPT2.encode('word ' * 128)[:128]
    status, answer = post_json(f'{server.url}/api/generate', {'model': NAME, 'prompt': GPT2.decode(ids), 'stream': False,
                                                               'options': {'num_predict': 3}})
    assert status == 200 and answer['prompt_eval_count'] == 128 and answer['eval_count'] == 3


@pytest.mark.parametrize('options, word', [
    ({'num_predict': 'ten'}, 'num_predict'), ({'num_predict': 1.5}, 'num_predict'), ({'num_predict': -3}, 'num_predict'),
    ({'num_predict': 10**6}, 'num_predict'), ({'temperature': -0.5}, 'temperature'), ({'temperature': 'hot'}, 'temperature'),
    ({'top_k': -1}, 'top_k'), ({'top_k': True}, 'top_k'), ({'seed': 'abc'}, 'seed'), ({'top_p': -1}, 'top_p'),
])
def test_bad_options_are_400(server, options, word):
    status, body = post_json(f'{server.url}/api/chat', {'model': NAME, 'messages': [{'role': 'user', 'content': 'Hi'}],
                                                         'options': options})
    assert status == 400 and word in body['error']


@pytest.mark.parametrize('body, word', [
    ({'messages': 'Hi'}, 'messages'), ({'messages': [{'role': 'wizard', 'content': 'Hi'}]}, 'role'),
    ({'messages': [{'role': 'user', 'content': 5}]}, 'content'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'stream': 'yes'}, 'stream'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'options': [1]}, 'options'),
])
def test_bad_requests_are_400(server, body, word):
    status, answer = post_json(f'{server.url}/api/chat', {'model': NAME, **body})
    assert status == 400 and word in answer['error']


@pytest.mark.parametrize('n', [0, 1, 5, 23])
def test_num_predict_and_max_tokens_are_exact(server, model, n):
    ids = chat_ids('Count')
    expected, m = reference(model, ids, n)
    assert m == n                                   # the end-of-text token is out of greedy reach
    status, body = post_json(f'{server.url}/api/chat', {'model': NAME, 'stream': False, 'options': {'num_predict': n},
                                                         'messages': [{'role': 'user', 'content': 'Count'}]})
    assert status == 200 and body['eval_count'] == n and body['message']['content'] == expected
    status, body = post_json(f'{server.url}/v1/chat/completions', {'model': NAME, 'max_tokens': n,
                                                                    'messages': [{'role': 'user', 'content': 'Count'}]})
    assert status == 200 and body['usage']['completion_tokens'] == n and body['choices'][0]['message']['content'] == expected


def test_temperature_and_seed(server, model):
    def ask(seed, route='/api/chat'):
        if route == '/api/chat':
            body = {'model': NAME, 'stream': False, 'messages': [{'role': 'user', 'content': 'Tell me a story'}],
                    'options': {'temperature': 1.0, 'seed': seed, 'num_predict': 12}}
            return post_json(f'{server.url}{route}', body)[1]['message']['content']
        body = {'model': NAME, 'temperature': 1.0, 'seed': seed, 'max_tokens': 12,
                'messages': [{'role': 'user', 'content': 'Tell me a story'}]}
        return post_json(f'{server.url}{route}', body)[1]['choices'][0]['message']['content']

    a, b, c = ask(7), ask(7), ask(8)
    assert a == b and a != c
    assert ask(7, '/v1/chat/completions') == a        # one sampler behind both protocols
    # the seed is that of a torch.Generator: chapter 5's sampling with the same generator gives the same tokens
    ids = chat_ids('Tell me a story')
    out = generate(model, torch.tensor([ids]), 12, temperature=1.0, generator=torch.Generator().manual_seed(7))[0, len(ids):]
    assert a == GPT2.decode(out.tolist())
    greedy = reference(model, ids, 12)[0]
    assert a != greedy


def test_stop_ids_end_the_reply(model):
    ids = chat_ids('Hello')
    tokens = generate_text_simple(model, torch.tensor([ids]), 8, 128)[0, len(ids):].tolist()
    stop = tokens[3]
    first = tokens.index(stop)
    with BackgroundServer(create_app(model, GPT2, NAME, stop_ids={stop})) as s:
        status, body = post_json(f'{s.url}/api/chat', {'model': NAME, 'stream': False, 'options': {'num_predict': 8},
                                                        'messages': [{'role': 'user', 'content': 'Hello'}]})
    assert body['done_reason'] == 'stop' and body['eval_count'] == first
    assert body['message']['content'] == GPT2.decode(tokens[:first])


def test_end_of_text_stops_generation():
    "A model that always predicts <|endoftext|> answers with nothing, done_reason 'stop'."
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)   # the last hidden state is all ones,
        model.out_head.weight.zero_()
        model.out_head.weight[EOT] = 1.0    # so the end-of-text logit is emb_dim and every other logit 0
    with BackgroundServer(create_app(model, GPT2, NAME)) as s:
        status, body = post_json(f'{s.url}/v1/chat/completions', {'model': NAME, 'messages': [{'role': 'user', 'content': 'Hi'}]})
    assert status == 200 and body['choices'][0]['finish_reason'] == 'stop' and body['usage']['completion_tokens'] == 0
    assert body['choices'][0]['message']['content'] == ''


def test_sixteen_concurrent_requests(server):
    prompts = [f'Question number {i}: what is {i} plus {i}?' for i in range(16)]

    def ask(i):
        if i % 2:   # half through Ollama's streamed chat, half through OpenAI's route
            return query_model(prompts[i], url=f'{server.url}/api/chat', options={'num_predict': 10})[0]
        body = {'model': NAME, 'max_tokens': 10, 'messages': [{'role': 'user', 'content': prompts[i]}]}
        return post_json(f'{server.url}/v1/chat/completions', body)[1]['choices'][0]['message']['content']

    alone = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone
    assert len(set(alone)) > 8          # different prompts, different answers: nothing was mixed up


def test_replies_stream_as_they_are_generated(model):
    "With 50 ms per token, the first line arrives long before the last: the reply is not buffered."
    with BackgroundServer(create_app(SlowModel(model, 0.05), GPT2, NAME)) as s:
        start = time.perf_counter()
        times = []
        with post(f'{s.url}/api/chat', {'model': NAME, 'options': {'num_predict': 12},
                                        'messages': [{'role': 'user', 'content': 'Hi'}]}) as r:
            for line in r:
                if line.strip():
                    times.append(time.perf_counter() - start)
    assert len(times) >= 6 and times[-1] - times[0] > 0.3


def test_client_disconnect_frees_the_model(model):
    "A client that leaves mid-stream stops its generation: the next request does not wait for 400 tokens."
    with BackgroundServer(create_app(SlowModel(model, 0.02), GPT2, NAME, max_tokens_limit=1000)) as s:
        r = post(f'{s.url}/api/chat', {'model': NAME, 'options': {'num_predict': 400},
                                       'messages': [{'role': 'user', 'content': 'Hi'}]})
        r.readline()
        r.close()                       # 400 tokens would take 8 s
        start = time.perf_counter()
        status, body = post_json(f'{s.url}/api/chat', {'model': NAME, 'stream': False, 'options': {'num_predict': 2},
                                                        'messages': [{'role': 'user', 'content': 'Hi'}]})
        elapsed = time.perf_counter() - start
    assert status == 200 and body['eval_count'] == 2
    assert elapsed < 4, elapsed


def _serve_threads():
    return [t for t in threading.enumerate() if t.name.startswith(('llm-serve', 'uvicorn'))]


def test_server_shuts_down_cleanly(model):
    before = _serve_threads()
    s = BackgroundServer(create_app(model, GPT2, NAME))
    query_model('Hi', url=f'{s.url}/api/chat', options={'num_predict': 3})
    port = s.port
    assert len(_serve_threads()) > len(before)
    s.stop()
    assert not s.thread.is_alive()
    assert _serve_threads() == before                    # the uvicorn thread and the model's worker thread have ended
    with socket.socket() as c:
        assert c.connect_ex(('127.0.0.1', port)) != 0     # nobody listens
    with socket.socket() as b:                            # and the port can be bound again
        b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        b.bind(('127.0.0.1', port))


def test_stop_during_a_stream(model):
    "Stopping the server while a long reply streams ends it within the graceful timeout."
    s = BackgroundServer(create_app(SlowModel(model, 0.02), GPT2, NAME, max_tokens_limit=2000))
    r = post(f'{s.url}/api/chat', {'model': NAME, 'options': {'num_predict': 2000}, 'messages': [{'role': 'user', 'content': 'Hi'}]})
    r.readline()
    start = time.perf_counter()
    s.stop()
    r.close()
    assert time.perf_counter() - start < 10 and not s.thread.is_alive()


def test_port_in_use_is_a_clear_error(server):
    with pytest.raises(OSError, match=f'cannot listen on 127.0.0.1:{server.port}'):
        BackgroundServer(create_app(tiny_gpt(), GPT2, NAME), port=server.port)


def test_create_app_checks_arguments(model):
    with pytest.raises(ValueError, match='max_tokens'):
        create_app(model, GPT2, max_tokens=-1)
    with pytest.raises(ValueError, match='temperature'):
        create_app(model, GPT2, temperature=-1)
    with pytest.raises(ValueError, match='context_length'):
        create_app(nn.Linear(2, 2), GPT2)


# Tokenizers of the later chapters (tiny files in the released formats)

@pytest.fixture(scope='module')
def chat_tokenizers(tmp_path_factory):
    pytest.importorskip('tokenizers')
    tiny_models = pytest.importorskip('tiny_models')
    from llm_from_scratch.gemma3 import GemmaTokenizer
    from llm_from_scratch.llama import ChatFormat, Llama3Tokenizer
    from llm_from_scratch.qwen3 import Qwen3Tokenizer
    d = tmp_path_factory.mktemp('toks')
    qwen = Qwen3Tokenizer(tiny_models.qwen3_tokenizer_file(d/'qwen.json'), repo_id='Qwen/Qwen3-0.6B')
    gemma = GemmaTokenizer(tiny_models.gemma3_tokenizer_file(d/'gemma.json'))
    llama = Llama3Tokenizer(tiny_models.llama3_tokenizer_file(d/'tokenizer.model'))
    return {'qwen3': qwen, 'gemma3': gemma, 'llama3': llama, 'llama3-chatformat': ChatFormat(llama)}


MESSAGES = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello world!'},
            {'role': 'assistant', 'content': 'How are you?'}, {'role': 'user', 'content': 'I think, therefore I am.'}]


def test_chat_tokenizer_uses_each_chat_template(chat_tokenizers):
    qwen, gemma, llama = chat_tokenizers['qwen3'], chat_tokenizers['gemma3'], chat_tokenizers['llama3']
    from llm_from_scratch.llama import ChatFormat
    assert ChatTokenizer(qwen).encode_chat(MESSAGES) == qwen.encode_chat(MESSAGES, enable_thinking=False)
    assert ChatTokenizer(qwen).encode_chat(MESSAGES, think=True) == qwen.encode_chat(MESSAGES, enable_thinking=True)
    assert ChatTokenizer(gemma).encode_chat(MESSAGES) == gemma.encode_chat(MESSAGES)
    assert ChatTokenizer(llama).encode_chat(MESSAGES) == ChatFormat(llama).encode_dialog_prompt(MESSAGES)
    assert ChatTokenizer(chat_tokenizers['llama3-chatformat']).encode_chat(MESSAGES) == ChatFormat(llama).encode_dialog_prompt(MESSAGES)
    assert [ChatTokenizer(t).template for t in (qwen, gemma, llama, GPT2)] == ['qwen3', 'gemma3', 'llama3', 'alpaca']
    # generation stops at the end of a turn and at the end of a text
    assert ChatTokenizer(qwen).stop_ids == {qwen.encode('<|im_end|>', chat_wrapped=False)[0], qwen.pad_token_id}
    assert ChatTokenizer(gemma).stop_ids == {gemma.eos_token_id, gemma.end_of_text_id}
    assert {llama.eot_id, llama.eos_id} <= ChatTokenizer(llama).stop_ids
    assert ChatTokenizer(GPT2).stop_ids == {EOT}
    # plain text: beginning-of-text where the model expects it
    assert ChatTokenizer(gemma).encode('Hello')[0] == gemma.bos_token_id
    assert ChatTokenizer(llama).encode('Hello') == llama.encode('Hello', bos=True)


@pytest.mark.parametrize('name', ['gpt2', 'qwen3', 'gemma3', 'llama3'])
def test_text_decoder_streams_whole_characters(chat_tokenizers, name):
    tok = GPT2 if name == 'gpt2' else chat_tokenizers[name]
    text = 'Hello wörld! ñandú 🙂 日本語 — I think, therefore I am. ' * 2
    ids = ChatTokenizer(tok).encode(text)
    whole = ChatTokenizer(tok).decode(ids)
    dec = TextDecoder(ChatTokenizer(tok))
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert ''.join(pieces) == whole
    assert not any('\ufffd' in p for p in pieces)


def test_serves_a_qwen3_chat_model(chat_tokenizers):
    "A tiny random Qwen3 behind the same routes: its chat template, its stop ids, its greedy tokens."
    from llm_from_scratch.qwen3 import QWEN_CONFIG_06_B, Qwen3Model
    qwen = chat_tokenizers['qwen3']
    cfg = {**QWEN_CONFIG_06_B, 'vocab_size': qwen.vocab_size, 'context_length': 128, 'emb_dim': 64, 'n_heads': 4, 'n_layers': 2,
           'hidden_dim': 96, 'head_dim': 16, 'n_kv_groups': 2, 'dtype': torch.float32}
    torch.manual_seed(0)
    model = unit_scale(Qwen3Model(cfg).eval())
    messages = MESSAGES[:2]
    ids = qwen.encode_chat(messages, enable_thinking=False)
    out = generate(model, torch.tensor([ids]), 10)[0, len(ids):].tolist()
    stops = ChatTokenizer(qwen).stop_ids
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    with BackgroundServer(create_app(model, qwen, 'qwen3-tiny')) as s:
        status, body = post_json(f'{s.url}/api/chat', {'model': 'qwen3-tiny', 'stream': False, 'messages': messages,
                                                        'options': {'num_predict': 10}})
        status2, body2 = post_json(f'{s.url}/api/generate', {'model': 'qwen3-tiny', 'stream': False, 'prompt': 'Hello world!',
                                                              'system': 'Be brief.', 'options': {'num_predict': 3}})
    assert status == 200 and body['prompt_eval_count'] == len(ids) and body['eval_count'] == cut
    assert body['message']['content'] == qwen.decode(out[:cut])
    assert status2 == 200 and body2['prompt_eval_count'] == len(ids)   # /api/generate applies the chat template


def test_chat_tokenizer_takes_the_command_lines_codec(chat_tokenizers):
    "`load_model_for_cli` returns a TextCodec: plain text, one-message chats, both end ids."
    cli = pytest.importorskip('llm_from_scratch.cli')
    if not hasattr(cli, 'TextCodec'):
        pytest.skip('llm_from_scratch.cli has no TextCodec')
    ct = ChatTokenizer(cli.tiktoken_codec())
    assert ct.template == 'alpaca' and ct.stop_ids == {EOT}
    assert ct.encode_chat(MESSAGES[1:2]) == chat_ids('Hello world!')
    qwen = chat_tokenizers['qwen3']
    end = qwen.encode('<|im_end|>', chat_wrapped=False)[0]
    codec = cli.TextCodec(lambda text: qwen.encode(text, chat_wrapped=False), qwen.decode, qwen.pad_token_id,
                          lambda text: qwen.encode_chat([{'role': 'user', 'content': text}], enable_thinking=False), end)
    ct = ChatTokenizer(codec)
    assert ct.template == 'codec' and ct.stop_ids == {qwen.pad_token_id, end}
    assert ct.encode_chat(MESSAGES[1:2]) == ChatTokenizer(qwen).encode_chat(MESSAGES[1:2])
    assert ct.decode(ct.encode('Hello world!')) == 'Hello world!'
    with pytest.raises(ValueError, match='one user message'):
        ct.encode_chat(MESSAGES)


# The command line

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, model):
    run = tmp_path_factory.mktemp('runs')/'tiny-run'
    save_checkpoint(run, model, {'step': 3}, {'model': CFG})
    return run


def parser():
    p = argparse.ArgumentParser(prog='llm-from-scratch')
    add_cli_parser(p.add_subparsers(dest='command'))
    return p


def test_cli_parser():
    args = parser().parse_args(['serve', 'some/run'])
    assert (args.checkpoint, args.model, args.host, args.port, args.name) == ('some/run', None, '127.0.0.1', 11434, None)
    assert args.func is cmd_serve
    args = parser().parse_args(['serve', '--model', 'qwen3-0.6b', '--weights', 'w.safetensors', '--host', '0.0.0.0', '--port', '8000',
                                '--name', 'q', '--max-tokens', '64'])
    assert (args.checkpoint, args.model, args.weights, args.host, args.port, args.name, args.max_tokens) == \
        (None, 'qwen3-0.6b', Path('w.safetensors'), '0.0.0.0', 8000, 'q', 64)


@pytest.mark.parametrize('argv, message', [
    (['serve'], 'checkpoint folder or --model'), (['serve', 'x', '--model', 'y'], 'checkpoint folder or --model'),
    (['serve', 'no/such/folder'], 'no checkpoint'), (['serve', '.', '--port', '70000'], '--port'),
])
def test_cli_usage_errors(argv, message):
    from llm_from_scratch.cli import CLIError
    args = parser().parse_args(argv)
    with pytest.raises(CLIError, match=message):
        args.func(args)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


CLI = ('import argparse, sys\n'
       'from llm_from_scratch.serve import add_cli_parser\n'
       'p = argparse.ArgumentParser(prog="llm-from-scratch")\n'
       'add_cli_parser(p.add_subparsers(dest="command"))\n'
       'args = p.parse_args(sys.argv[1:])\n'
       'sys.exit(args.func(args))\n')


def test_cli_serves_a_checkpoint_and_stops_on_ctrl_c(run_dir, model):
    port = _free_port()
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    proc = subprocess.Popen([sys.executable, '-c', CLI, 'serve', str(run_dir), '--port', str(port), '--device', 'cpu',
                             '--log-level', 'warning'], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, tags = time.monotonic() + 90, None
        while tags is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/tags', timeout=2) as r:
                    tags = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert tags is not None, proc.stdout.read() if proc.poll() is not None else 'the server did not start'
        assert [m['name'] for m in tags['models']] == ['tiny-run']          # the run folder's name
        text, lines = query_model('Hello', model='tiny-run', url=f'http://127.0.0.1:{port}/api/chat', options={'num_predict': 5})
        assert text == reference(model, chat_ids('Hello'), 5)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    out = proc.stdout.read()
    assert rc == 0, out
    assert f'serving tiny-run at http://127.0.0.1:{port}/' in out and 'stopped serving tiny-run' in out
    with socket.socket() as c:
        assert c.connect_ex(('127.0.0.1', port)) != 0


def test_serve_names_the_model_after_its_run_folder(run_dir, model):
    from llm_from_scratch.serve import _load
    step = next(run_dir.glob('step-*'))
    for source in (run_dir, step):
        loaded, tokenizer, name = _load(source, device='cpu')
        assert name == 'tiny-run' and ChatTokenizer(tokenizer).stop_ids == {EOT}
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)


def test_serve_reports_a_busy_port_before_loading(server):
    from llm_from_scratch.serve import serve
    with pytest.raises(OSError, match=f'cannot listen on 127.0.0.1:{server.port}'):
        serve('no-such-model', port=server.port)    # a model load would fail differently
