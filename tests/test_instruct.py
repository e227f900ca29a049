"Chapter 7 against independent references: the book's strings and demos, manual cross-entropy, a fake Ollama server."
import http.server
import json
import math
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest
import tiktoken
import torch
import torch.nn.functional as F

from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.instruct import (
    InstructionDataset,
    check_if_running,
    custom_collate_draft_1,
    custom_collate_draft_2,
    custom_collate_fn,
    download_and_load_file,
    exact_match,
    finetune_instruct,
    format_input,
    format_response,
    generate_model_scores,
    generate_response,
    normalize_answer,
    parse_score,
    query_model,
    response_loss,
    split_instruction_data,
)
from llm_from_scratch.pretrain import calc_loss_batch

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
TINY_CFG = {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
            "attn_impl": "sdpa"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPTModel(TINY_CFG).eval()


ENTRIES = [
    {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
     "output": "The correct spelling is 'Occasion.'"},
    {"instruction": "What is an antonym of 'complicated'?", "input": "", "output": "simple"},
    {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45 kilometers is 45000 meters."},
]


# ---- formatting and data --------------------------------------------------------------------------------------

def test_format_input_matches_the_book_character_for_character():
    assert format_input(ENTRIES[0]) == (PREAMBLE + "\n\n### Instruction:\nIdentify the correct spelling of the following word."
                                        "\n\n### Input:\nOcassion")
    assert format_input(ENTRIES[1]) == PREAMBLE + "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
    assert format_input({"instruction": "Hi"}) == PREAMBLE + "\n\n### Instruction:\nHi"  # no input key at all
    assert format_response(ENTRIES[0]) == "\n\n### Response:\nThe correct spelling is 'Occasion.'"


def test_download_and_load_file_and_split(tmp_path):
    data = download_and_load_file()
    assert len(data) == 1100
    train, test, val = split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train + test + val == data  # in order, nothing lost or repeated
    # a file_path is filled once, then read as it is (the book's behaviour)
    path = tmp_path/"instruction-data.json"
    assert download_and_load_file(path, "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                                        "01_main-chapter-code/instruction-data.json") == data
    assert path.is_file()
    path.write_text(json.dumps(ENTRIES))
    assert download_and_load_file(path) == ENTRIES
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="not a list of entries"):
        download_and_load_file(path)
    with pytest.raises(ValueError, match="at most 1"):
        split_instruction_data(data, 0.9, 0.2)


def test_download_from_another_url(tmp_path):
    "A URL other than the book's is fetched as it is, without a checksum."
    served = tmp_path/"srv"
    served.mkdir()
    (served/"my-entries.json").write_text(json.dumps(ENTRIES))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/my-entries.json"
        assert download_and_load_file(tmp_path/"copy.json", url) == ENTRIES
        assert json.loads((tmp_path/"copy.json").read_text()) == ENTRIES
    finally:
        server.shutdown()
        server.server_close()


def test_instruction_dataset(tokenizer):
    ds = InstructionDataset(ENTRIES, tokenizer)
    assert len(ds) == 3
    for entry, ids in zip(ENTRIES, ds):
        assert tokenizer.decode(ids) == format_input(entry) + format_response(entry)
    masked = InstructionDataset(ENTRIES, tokenizer, mask_instruction=True)
    n, ids = masked[0]
    assert ids == ds[0] and n == len(tokenizer.encode(format_input(ENTRIES[0])))
    assert tokenizer.decode(ids[n:]) == format_response(ENTRIES[0])
    own = InstructionDataset(ENTRIES, tokenizer, lambda e: f"Q: {e['instruction']}", lambda e: f"\nA: {e['output']}")
    assert tokenizer.decode(own[1]) == "Q: What is an antonym of 'complicated'?\nA: simple"


# ---- collate functions ----------------------------------------------------------------------------------------

BATCH = ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])


def test_collate_drafts_and_final_the_book_demo():
    assert custom_collate_draft_1(BATCH).tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    inputs, targets = custom_collate_draft_2(BATCH)
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, 50256, 50256, 50256], [8, 9, 50256, 50256, 50256]]
    inputs, targets = custom_collate_fn(BATCH)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long
    assert [list(b) for b in BATCH] == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the examples are not changed


def test_collate_options():
    inputs, targets = custom_collate_fn(BATCH, pad_token_id=0, ignore_index=-1)
    assert targets.tolist() == [[1, 2, 3, 4, 0], [6, 0, -1, -1, -1], [8, 9, 0, -1, -1]]
    # allowed_max_length cuts inputs and targets alike, after the targets are made
    inputs, targets = custom_collate_fn(BATCH, allowed_max_length=2)
    assert inputs.tolist() == [[0, 1], [5, 6], [7, 8]]
    assert targets.tolist() == [[1, 2], [6, 50256], [8, 9]]
    inputs, targets = custom_collate_fn(BATCH, allowed_max_length=100)  # longer than the batch: no effect
    assert inputs.shape == (3, 5)
    # the book's rule counts token ids, not positions: an <|endoftext|> inside an example is the first one kept,
    # and the end token after it is masked
    _, targets = custom_collate_fn([[1, 50256, 2], [3]])
    assert targets.tolist() == [[50256, 2, -100], [50256, -100, -100]]
    with pytest.raises(ValueError, match="empty"):
        custom_collate_fn([])


def test_collate_masks_prompts_of_pairs():
    inputs, targets = custom_collate_fn([(3, [0, 1, 2, 3, 4]), (1, [5, 6]), (2, [7, 8, 9])])
    assert inputs.tolist() == custom_collate_fn(BATCH)[0].tolist()
    assert targets.tolist() == [[-100, -100, 3, 4, 50256], [6, 50256, -100, -100, -100], [-100, 9, 50256, -100, -100]]


def test_ignored_targets_contribute_nothing_to_the_loss(tokenizer, tiny_model):
    "calc_loss_batch on a collated batch equals the mean over the kept positions, computed example by example."
    ids = [tokenizer.encode(format_input(e) + format_response(e)) for e in ENTRIES]
    inputs, targets = custom_collate_fn(ids)
    loss = calc_loss_batch(inputs, targets, tiny_model, "cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in ids:  # each example alone, unpadded, with its end token as the last target
            x = torch.tensor([seq])
            y = torch.tensor(seq[1:] + [50256])
            logp = torch.log_softmax(tiny_model(x)[0].double(), dim=-1)
            total -= logp[torch.arange(len(seq)), y].sum().item()
            count += len(seq)
    assert count == int((targets != -100).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # whatever the model predicts at the ignored positions, the loss is the same
    logits = torch.randn(*targets.shape, 50257)
    noisy = logits.clone()
    noisy[targets == -100] = torch.randn_like(noisy[targets == -100]) * 100
    assert F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item() == pytest.approx(
        F.cross_entropy(noisy.flatten(0, 1), targets.flatten()).item(), rel=1e-6)


def test_book_cross_entropy_demo():
    logits = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    assert F.cross_entropy(logits[:2], torch.tensor([0, 1])).item() == pytest.approx(1.1269, abs=1e-4)
    assert F.cross_entropy(logits, torch.tensor([0, 1, 1])).item() == pytest.approx(0.7936, abs=1e-4)
    assert F.cross_entropy(logits, torch.tensor([0, 1, -100])).item() == pytest.approx(1.1269, abs=1e-4)


# ---- generation and judge-free metrics ------------------------------------------------------------------------

def test_generate_response_is_the_greedy_continuation(tokenizer, tiny_model):
    entry = ENTRIES[1]
    prompt = tokenizer.encode(format_input(entry))
    seq = list(prompt)
    with torch.no_grad():  # a plain greedy loop, no cache, as the reference
        for _ in range(8):
            nxt = int(tiny_model(torch.tensor([seq[-64:]]))[0, -1].argmax())
            if nxt == 50256:
                break
            seq.append(nxt)
    expected = tokenizer.decode(seq)[len(format_input(entry)):].replace("### Response:", "").strip()
    assert generate_response(tiny_model, entry, tokenizer, max_new_tokens=8) == expected


def test_response_loss_against_a_manual_computation(tokenizer, tiny_model):
    "Only the output tokens and the end token are scored, each given everything before it."
    total, count = 0.0, 0
    with torch.no_grad():
        for e in ENTRIES:
            prompt = tokenizer.encode(format_input(e) + "\n\n### Response:\n")
            answer = tokenizer.encode(e["output"]) + [50256]
            full = prompt + answer
            logp = torch.log_softmax(tiny_model(torch.tensor([full[:-1]]))[0].double(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(full) - 1)
            total -= logp[positions, torch.tensor(answer)].sum().item()
            count += len(answer)
    for batch_size in (1, 2, 8):  # the batching and padding do not change the result
        r = response_loss(tiny_model, ENTRIES, tokenizer, batch_size=batch_size)
        assert r["tokens"] == count
        assert r["loss"] == pytest.approx(total / count, rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    with pytest.raises(ValueError, match="no entries"):
        response_loss(tiny_model, [], tokenizer)


def test_response_loss_of_a_model_that_knows_the_answer(tokenizer):
    "A model that puts all its probability on the right next token has loss 0 and perplexity 1."
    entry = ENTRIES[1]
    full = tokenizer.encode(format_input(entry) + format_response(entry)) + [50256]

    class Oracle(torch.nn.Module):
        cfg = {"context_length": 128}

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            out = torch.full((*idx.shape, 50257), -1e4)
            for b in range(idx.shape[0]):
                for t in range(idx.shape[1]):
                    if t + 1 < len(full):
                        out[b, t, full[t + 1]] = 1e4
            return out

    r = response_loss(Oracle(), [entry], tokenizer)
    assert r["loss"] == pytest.approx(0.0, abs=1e-6) and r["perplexity"] == pytest.approx(1.0)


def test_exact_match_and_normalization():
    assert normalize_answer("  The  'Occasion.' ") == "the occasion"
    assert normalize_answer("Moon, AND sun!") == "moon and sun"
    data = [{"output": "Zn.", "model_response": "zn"},
            {"output": "True", "model_response": "False"},
            {"output": "Hasta luego", "model_response": "hasta   luego!"},
            {"output": "This has more than three words.", "model_response": "This has more than three words."}]
    assert exact_match(data) == {"entries": 3, "matches": 2, "accuracy": pytest.approx(2 / 3)}
    assert exact_match(data, max_words=10) == {"entries": 4, "matches": 3, "accuracy": 0.75}
    assert exact_match([{"output": "a", "answer": "A."}], json_key="answer")["matches"] == 1
    with pytest.raises(ValueError, match="at most 1 words"):
        exact_match(data[3:], max_words=1)
    with pytest.raises(ValueError, match="max_words"):
        exact_match(data, max_words=0)


# ---- the judge: a fake Ollama server --------------------------------------------------------------------------

class FakeOllama(http.server.BaseHTTPRequestHandler):
    "Streams `reply(prompt)` in pieces of two characters as Ollama's /api/chat does; records the requests."
    requests: list = []
    reply = staticmethod(lambda prompt: "50")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOllama.requests.append((self.path, body))
        if body["model"] == "missing":
            data = json.dumps({"error": "model 'missing' not found"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        text = FakeOllama.reply(body["messages"][-1]["content"])
        if text == "<stream error>":
            self.wfile.write(b'{"error": "out of memory"}\n')
            return
        for i in range(0, len(text), 2):
            self.wfile.write((json.dumps({"model": body["model"], "message": {"role": "assistant", "content": text[i:i + 2]},
                                          "done": False}) + "\n").encode())
            self.wfile.flush()
        self.wfile.write((json.dumps({"model": body["model"], "message": {"role": "assistant", "content": ""},
                                      "done": True}) + "\n").encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_ollama():
    FakeOllama.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/chat"
    server.shutdown()
    server.server_close()


def test_query_model_joins_the_stream(fake_ollama):
    FakeOllama.reply = staticmethod(lambda prompt: f"Llamas eat {prompt[-6:]}, mostly.")
    assert query_model("grass and hay", url=fake_ollama) == "Llamas eat nd hay, mostly."
    path, body = FakeOllama.requests[-1]
    assert path == "/api/chat"
    assert body == {"model": "llama3", "messages": [{"role": "user", "content": "grass and hay"}],
                    "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    query_model("x", model="phi3", url=fake_ollama, seed=7, num_ctx=512)
    assert FakeOllama.requests[-1][1]["options"] == {"seed": 7, "temperature": 0, "num_ctx": 512}
    assert FakeOllama.requests[-1][1]["model"] == "phi3"


def test_query_model_reports_server_errors(fake_ollama):
    with pytest.raises(RuntimeError, match="404: model 'missing' not found"):
        query_model("hi", model="missing", url=fake_ollama)
    FakeOllama.reply = staticmethod(lambda prompt: "<stream error>")
    with pytest.raises(RuntimeError, match="out of memory"):
        query_model("hi", url=fake_ollama)


def test_parse_score():
    assert [parse_score(s) for s in ("0", "100", " 42\n", "7.")] == [0, 100, 42, 7]
    for bad in ("101", "-1", "4 2", "Score: 80", "eighty", "", "80/100"):
        with pytest.raises(ValueError, match="not a score"):
            parse_score(bad)


def test_generate_model_scores_keeps_good_scores_and_names_bad_entries(fake_ollama):
    entries = [{**e, "model_response": r} for e, r in zip(ENTRIES, ("The spelling is Occasion.", "easy", "45000 m"))]
    replies = {"The spelling is Occasion.": "90", "easy": "I would give this 40", "45000 m": " 75\n"}
    FakeOllama.reply = staticmethod(lambda prompt: next(v for k, v in replies.items() if f"response `{k}`" in prompt))
    with pytest.warns(UserWarning, match=r"entry 1 \(\"What is an antonym of 'complicated'\?\"\): could not convert score"):
        scores = generate_model_scores(entries, "model_response", url=fake_ollama, progress=False)
    assert scores == [90, 75]
    prompt = FakeOllama.requests[0][1]["messages"][0]["content"]
    assert prompt == (f"Given the input `{format_input(entries[0])}` and correct output `{entries[0]['output']}`, "
                      "score the model response `The spelling is Occasion.` on a scale from 0 to 100, "
                      "where 100 is the best score. Respond with the integer number only.")
    assert sum(scores) / len(scores) == 82.5


def test_generate_model_scores_with_the_server_down(tokenizer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/chat"
    entries = [{**e, "model_response": "x"} for e in ENTRIES[:2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert generate_model_scores(entries, "model_response", url=url, progress=False) == []
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith("entry 0 ('Identify the correct spelling of the fol')") and url in messages[0]
    assert messages[1].startswith("entry 1 ") and "failed" in messages[1]


def test_generate_model_scores_unknown_model_per_entry(fake_ollama):
    entries = [{**ENTRIES[0], "model_response": "x"}]
    with pytest.warns(UserWarning, match="entry 0 .*404: model 'missing' not found"):
        assert generate_model_scores(entries, "model_response", model="missing", url=fake_ollama, progress=False) == []


def test_check_if_running(monkeypatch):
    "Through /proc when psutil is missing: a process found by its argv[0]; none found for a made-up name."
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` fails: the /proc fallback
    name = f"llmfs-probe-{time.time_ns() % 10**6}"
    proc = subprocess.Popen(["bash", "-c", f"exec -a {name} sleep 30"])
    try:
        deadline = time.time() + 5
        while not check_if_running(name) and time.time() < deadline:
            time.sleep(0.05)
        assert check_if_running(name)
        assert check_if_running("sleep")
        assert not check_if_running(name + "-nope")
    finally:
        proc.kill()
        proc.wait()
    assert not check_if_running(name)


# ---- the command-line recipe ----------------------------------------------------------------------------------

def test_finetune_instruct_saves_a_loadable_checkpoint(tmp_path, tokenizer):
    from llm_from_scratch.classify import load_base_model
    from llm_from_scratch.trainer import save_checkpoint
    torch.manual_seed(1)
    save_checkpoint(tmp_path/"base", GPTModel(TINY_CFG), {"step": 0}, {"model": TINY_CFG})
    data = download_and_load_file()[:20]
    path = finetune_instruct(tmp_path/"base", data, epochs=1, lr=1e-3, out_dir=tmp_path/"sft", device="cpu",
                             eval_freq=1, eval_iter=1, quiet=True)
    config = json.loads((path/"config.json").read_text())
    assert config["sft"]["epochs"] == 1 and config["sft"]["allowed_max_length"] == 64
    assert len(config["sft"]["train_losses"]) == 2
    tuned = load_base_model(tmp_path/"sft", device="cpu")
    base = load_base_model(tmp_path/"base", device="cpu")
    assert not torch.equal(tuned.tok_emb.weight, base.tok_emb.weight)
    with pytest.raises(ValueError, match="epochs"):
        finetune_instruct(tmp_path/"base", data, epochs=0)
    with pytest.raises(ValueError, match="too few"):
        finetune_instruct(tmp_path/"base", data[:5], quiet=True)


def test_cli_parser():
    import argparse

    from llm_from_scratch.instruct import add_cli_parser
    p = argparse.ArgumentParser()
    add_cli_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["finetune-instruct", "ckpt", "--epochs", "3", "--lr", "1e-4", "--out", "o", "--mask-instruction"])
    assert (args.base, args.epochs, args.lr, args.out, args.mask_instruction) == ("ckpt", 3, 1e-4, "o", True)
