"The chat page in a real browser: headless Chromium, driven by Playwright, types a message and sees the reply stream in."
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import tiktoken
import torch

from tiny_models import SlowModel

from llm_from_scratch.gpt import GPTModel
from llm_from_scratch.serve import BackgroundServer, create_app
from llm_from_scratch.trainer import MODEL_CONFIGS

CHROMIUM = Path('/usr/bin/chromium')
# The machine's network is closed: Chromium must not try to reach Google's services in the background.
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
NAME = 'tiny-gpt'


def _chromium() -> str:
    if CHROMIUM.is_file():
        return str(CHROMIUM)
    found = shutil.which('chromium')
    if found is None:
        pytest.skip('Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it where it can)')
    return found


@pytest.fixture(scope='module')
def server():
    torch.manual_seed(123)
    model = GPTModel({**MODEL_CONFIGS['gpt-small-test'], 'context_length': 256}).eval()
    with BackgroundServer(create_app(SlowModel(model), tiktoken.get_encoding('gpt2'), NAME)) as s:
        yield s


@pytest.fixture(scope='module')
def page(server):
    sync_api = pytest.importorskip('playwright.sync_api', reason='Playwright for Python is not installed (pip install playwright)')
    executable = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def expected_reply(server, messages, options):
    body = {'model': NAME, 'messages': messages, 'stream': False, 'options': options}
    request = urllib.request.Request(f'{server.url}/api/chat', data=json.dumps(body).encode(), method='POST',
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())['message']['content']


def test_chat_page_streams_a_reply(server, page):
    page.goto(server.url + '/')
    assert NAME in page.title()
    page.fill('#max-tokens', '20')
    # count how often the reply's text changes while it streams
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill('#prompt', 'What is the capital of France?')
    page.press('#prompt', 'Enter')
    page.wait_for_selector('.msg.user')
    assert page.inner_text('.msg.user') == 'What is the capital of France?'
    page.wait_for_function("() => (document.querySelector('.msg.assistant')?.textContent || '').length > 0", timeout=30_000)
    partial = page.inner_text('.msg.assistant')
    page.wait_for_selector('.msg.assistant[data-done]', timeout=60_000)
    reply = page.eval_on_selector('.msg.assistant', 'e => e.textContent')
    assert page.get_attribute('.msg.assistant', 'data-done') == 'length'
    options = {'temperature': 0, 'num_predict': 20, 'seed': 123}
    assert reply == expected_reply(server, [{'role': 'user', 'content': 'What is the capital of France?'}], options)
    assert reply.startswith(partial) and len(partial) < len(reply)   # it was seen half-written
    assert page.evaluate('window.updates') > 5                        # and grew piece by piece

    # the second message carries the conversation so far
    page.fill('#prompt', 'And of Italy?')
    page.click('#send')
    page.wait_for_selector('.msg.assistant:nth-of-type(4)[data-done]', timeout=60_000)
    second = page.eval_on_selector_all('.msg.assistant', 'es => es.map(e => e.textContent)')[1]
    history = [{'role': 'user', 'content': 'What is the capital of France?'}, {'role': 'assistant', 'content': reply},
               {'role': 'user', 'content': 'And of Italy?'}]
    assert second == expected_reply(server, history, options)


def test_chat_page_shows_errors(server, page):
    page.goto(server.url + '/')
    page.fill('#temperature', '-1')
    page.fill('#prompt', 'Hello')
    page.click('#send')
    page.wait_for_selector('.msg.assistant.error', timeout=30_000)
    assert 'temperature' in page.inner_text('.msg.assistant.error')
