"`generate --model NAME --weights DIR`: tiny random Hugging Face folders against transformers' greedy `generate`, errors, the hook."
import argparse
import json
import shutil
import subprocess
import sys
import types

import pytest
import tiktoken
import torch

from llm_from_scratch import cli
from llm_from_scratch.cli import MODEL_LOADERS, TextStream, load_model_for_cli, main
from llm_from_scratch.llama import Llama3Tokenizer

import tiny_models

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

PROMPT = "Hello world! How are you"


def _fast(path):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))


def reference_tokenizer(name, folder):
    "An independent (encode, decode, end-of-text id) for the tiny folder: transformers' fast tokenizer, tiktoken, or Llama's file."
    if name.startswith("gpt2"):
        tok = tiktoken.get_encoding("gpt2")
        return tok.encode, tok.decode, tok.eot_token
    if name.startswith("llama"):
        tok = Llama3Tokenizer(folder/"original"/"tokenizer.model")   # tiktoken underneath; tested against transformers in test_llama
        return (lambda t: tok.encode(t, bos=True)), tok.decode, tok.eos_id
    fast = _fast(folder/"tokenizer.json")
    end = "<|endoftext|>" if name.startswith("qwen3") else "<eos>"
    return ((lambda t: fast.encode(t)), (lambda ids: fast.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)),
            fast.convert_tokens_to_ids(end))


BUILDERS = {"gpt2-124m": tiny_models.gpt2_folder, "qwen3-0.6b": tiny_models.qwen3_folder, "llama3.2-1b": tiny_models.llama3_folder,
            "gemma3-270m": tiny_models.gemma3_folder}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    "One tiny random transformers model per architecture, saved (safetensors, float32) with its tokenizer files."
    out = {}
    for name, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = (build(folder), folder)
    return out


def hf_greedy(hf, ids, n, eos):
    "transformers' greedy continuation of `ids`, cut before the first end token."
    idx = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, idx.shape[1]:].tolist()
    return new[:new.index(eos)] if eos in new else new


@pytest.mark.parametrize("name", BUILDERS)
def test_generate_named_model_matches_transformers(name, folders, capsys):
    "A tiny folder under a big model's name: its config.json sets the sizes; the printed text is transformers' greedy continuation."
    hf, folder = folders[name]
    encode, decode, eos = reference_tokenizer(name, folder)
    expected = PROMPT + decode(hf_greedy(hf, encode(PROMPT), 12, eos)) + "\n"
    assert main(["generate", "--model", name, "--weights", str(folder), "--max-new-tokens", "12", "--device", "cpu", PROMPT]) == 0
    assert capsys.readouterr().out == expected


def test_tiny_folder_overrides_the_named_size(folders):
    _, folder = folders["qwen3-0.6b"]
    model, codec = load_model_for_cli(argparse.Namespace(model="qwen3-0.6b", weights=folder, device="cpu", dtype="bfloat16"))
    assert model.cfg["emb_dim"] == 64 and model.cfg["n_layers"] == 2         # the folder's config, not Qwen3-0.6B's 1024 and 28
    assert next(model.parameters()).dtype == torch.bfloat16                  # --dtype
    assert codec.decode(codec.encode(PROMPT)) == PROMPT


@pytest.mark.parametrize("name", ["qwen3-0.6b", "gemma3-270m", "llama3.2-1b"])
def test_chat_prints_the_answer(name, folders, capsys):
    "--chat: the prompt goes through the chat template; the answer is transformers' greedy one, stopped at the end of the turn."
    hf, folder = folders[name]
    _, codec = MODEL_LOADERS[name](folder, "cpu", None)
    ids = codec.encode_chat(PROMPT)
    assert len(ids) > len(codec.encode(PROMPT)) + 2                       # the template's tokens around the message
    expected = codec.decode(hf_greedy(hf, ids, 10, codec.chat_eos_id)) + "\n"
    assert main(["generate", "--model", name, "--weights", str(folder), "--chat", "--max-new-tokens", "10", "--device", "cpu", PROMPT]) == 0
    assert capsys.readouterr().out == expected


def test_text_stream_holds_back_split_characters():
    "Tokens that split a character are shown once the character is whole; the pieces add up to the decoded text."
    tok = tiktoken.get_encoding("gpt2")
    text = "日本語 ☕ ünïcödé"
    ids = tok.encode(text)
    stream = TextStream(tok.decode)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces) and "" in pieces          # something was held back


def one_line_error(argv, capsys):
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    return err


def test_errors_are_one_line(folders, tmp_path, capsys):
    _, folder = folders["qwen3-0.6b"]
    err = one_line_error(["generate", "--model", "qwen4", "Hi"], capsys)
    assert "unknown model 'qwen4'" in err and all(n in err for n in MODEL_LOADERS)
    missing = str(tmp_path/"nope")
    assert "no such file or folder" in one_line_error(["generate", "--model", "qwen3-0.6b", "--weights", missing, "Hi"], capsys)
    (tmp_path/"empty").mkdir()
    assert "no config.json" in one_line_error(["generate", "--model", "qwen3-0.6b", "--weights", str(tmp_path/"empty"), "Hi"], capsys)
    no_weights = tmp_path/"no-weights"
    shutil.copytree(folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert "no *.safetensors" in one_line_error(["generate", "--model", "qwen3-0.6b", "--weights", str(no_weights), "Hi"], capsys)
    assert "must be a Hugging Face folder" in one_line_error(
        ["generate", "--model", "gemma3-270m", "--weights", str(folder/"model.safetensors"), "Hi"], capsys)
    assert "--weights goes with --model" in one_line_error(["generate", str(folder), "Hi", "--weights", str(folder)], capsys)
    assert "no chat template" in one_line_error(
        ["generate", "--model", "gpt2-124m", "--weights", str(folders["gpt2-124m"][1]), "--chat", "Hi"], capsys)


def test_mismatched_weights_name_the_tensor(folders, tmp_path, capsys):
    "A config.json that disagrees with the weights: the error names a tensor and its shapes, on one line."
    _, folder = folders["qwen3-0.6b"]
    bad = tmp_path/"bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad/"config.json").read_text())
    (bad/"config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    err = one_line_error(["generate", "--model", "qwen3-0.6b", "--weights", str(bad), "Hi"], capsys)
    assert "mlp" in err and "128" in err


@pytest.mark.parametrize("name, says", [("gpt2-124m", "model.safetensors"), ("qwen3-0.6b", "Qwen3-0.6B/config.json"),
                                        ("llama3.2-1b", "gated"), ("gemma3-270m", "gated")])
def test_offline_download_is_one_line(name, says, monkeypatch, capsys):
    "No --weights and no network: download's message (what to fetch, where to put it), joined into one line."
    import urllib.request

    def no_network(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv("LLM_FROM_SCRATCH_DATA", raising=False)           # no prefetched copies either
    err = one_line_error(["generate", "--model", name, "Hi"], capsys)
    assert "Could not download" in err and says in err and "network is unreachable" in err


def test_console_script_errors_have_no_traceback(tmp_path):
    exe = shutil.which("llm-from-scratch")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from llm_from_scratch.cli import main; sys.exit(main())"]
    for args in (["generate", "--model", "no-such-model", "Hi"], ["generate", "--model", "qwen3-0.6b", "--weights", str(tmp_path), "Hi"]):
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cli_modules_hook(monkeypatch, capsys):
    "A module named in CLI_MODULES adds its subcommands through add_cli_parser; one without it adds nothing."
    plugin = types.ModuleType("llm_from_scratch._hook_test")

    def add_cli_parser(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)
    plugin.add_cli_parser = add_cli_parser
    monkeypatch.setitem(sys.modules, "llm_from_scratch._hook_test", plugin)
    monkeypatch.setattr(cli, "CLI_MODULES", ("_hook_test", "core"))      # core has no add_cli_parser
    assert main(["hello", "--name", "reader"]) == 0
    assert capsys.readouterr().out == "hello reader\n"
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"doctor", "pretrain", "generate", "hello"} <= set(commands)
