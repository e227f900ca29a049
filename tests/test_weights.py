"Loading GPT-2 weights: parity with Hugging Face on a tiny random model, OpenAI's TensorFlow layout, bad checkpoints."
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from llm_from_scratch.core import REGISTRY, DownloadError
from llm_from_scratch.gpt import GPTModel
from llm_from_scratch.weights import (PRETRAINED_GPT2, download_and_load_gpt2, gpt2_config, gpt2_config_from_hparams, gpt2_name_map,
                                      hf_name, init_empty_weights, load_gpt2_params_from_tf_ckpt, load_gpt2_safetensors,
                                      load_pretrained_gpt2, load_weights_into_gpt, openai_name)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

N_LAYER, N_HEAD, N_EMBD, N_CTX, VOCAB = 2, 4, 64, 32, 50257
PROMPT = [[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]]  # "Every effort moves you", "Every day holds a"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    "A tiny random Hugging Face GPT-2 (every weight random, layer norms and biases too), saved with save_pretrained."
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_positions=N_CTX, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD, vocab_size=VOCAB)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("hf")/"tiny-gpt2"
    hf.save_pretrained(d)
    return hf, d


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in after.items():
        assert torch.equal(v, before[k]), f"{k} changed"


def openai_arrays(hf):
    "The Hugging Face model's weights under OpenAI's names and shapes (conv weights with their leading 1)."
    out = {}
    for k, v in hf.state_dict().items():
        name = openai_name(k)
        if name is None:
            continue
        a = v.detach().numpy().copy()
        if name.endswith("/w"):
            a = a[None]  # OpenAI's convolutions: (1, in, out)
        out[name] = a
    return out


# -- Hugging Face safetensors ---------------------------------------------------------------------------------------

def test_hf_layout_keys_are_what_we_expect(hf_model):
    _, d = hf_model
    keys = set(load_file(d/"model.safetensors"))
    mapped = {openai_name(k) for k in keys} - {None}
    expected = {s.name for s in gpt2_name_map(N_LAYER).values()}
    assert mapped == expected
    assert all(hf_name(openai_name(k)) == k.removeprefix("transformer.") for k in keys if openai_name(k))


def test_safetensors_logits_match_hugging_face(hf_model):
    hf, d = hf_model
    cfg = gpt2_config_from_hparams(json.loads((d/"config.json").read_text()))
    torch.manual_seed(1)
    model = load_gpt2_safetensors(GPTModel(cfg), d/"model.safetensors").eval()
    idx = torch.tensor(PROMPT)
    diff = (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item()
    assert diff <= 1e-5, diff
    assert model.out_head.weight is model.tok_emb.weight
    # random inputs over the whole context
    idx = torch.randint(0, VOCAB, (3, N_CTX))
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-5


def test_sdpa_attention_path_loads_the_same(hf_model):
    hf, d = hf_model
    model, cfg = load_pretrained_gpt2(d, device="cpu")
    sdpa = load_gpt2_safetensors(GPTModel({**cfg, "attn_impl": "sdpa"}), d/"model.safetensors").eval()
    idx = torch.tensor(PROMPT)
    assert (our_logits(sdpa, idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-5


def test_load_pretrained_gpt2_from_folder_file_and_pth(hf_model, tmp_path):
    hf, d = hf_model
    idx = torch.tensor(PROMPT)
    ref = hf_logits(hf, idx)
    model, cfg = load_pretrained_gpt2(d, device="cpu")
    assert not model.training
    assert cfg["qkv_bias"] and cfg["context_length"] == N_CTX and cfg["vocab_size"] == VOCAB
    assert (our_logits(model, idx) - ref).abs().max().item() <= 1e-5
    # a lone .safetensors file without config.json: the size is read from the shapes (n_heads from the width)
    lone = tmp_path/"lone.safetensors"
    lone.write_bytes((d/"model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="width 64 is not a GPT-2 size"):
        load_pretrained_gpt2(lone, device="cpu")
    # our own layout: a state dict with an untied head (as the book's .pth copies), and a tied one as safetensors
    torch.save(model.state_dict(), tmp_path/"ours.pth")
    (tmp_path/"config.json").write_text((d/"config.json").read_text())
    m2, _ = load_pretrained_gpt2(tmp_path/"ours.pth", device="cpu")
    assert (our_logits(m2, idx) - ref).abs().max().item() <= 1e-5
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "out_head.weight" and not k.endswith(".mask")}
    save_file(sd, tmp_path/"ours.safetensors")
    m3, _ = load_pretrained_gpt2(tmp_path/"ours.safetensors", device="cpu")
    assert m3.out_head.weight is m3.tok_emb.weight
    assert (our_logits(m3, idx) - ref).abs().max().item() <= 1e-5


def test_init_empty_weights():
    with init_empty_weights():
        m = GPTModel(gpt2_config("gpt2-355m"))
    assert {p.device.type for p in m.parameters()} == {"meta"}
    assert {b.device.type for b in m.buffers()} == {"cpu"}
    # the patch is gone afterwards
    small = GPTModel({**gpt2_config("124M"), "n_layers": 1, "vocab_size": 10, "emb_dim": 8, "n_heads": 2})
    assert small.tok_emb.weight.device.type == "cpu"


def test_load_with_dtype(hf_model):
    hf, d = hf_model
    model, _ = load_pretrained_gpt2(d, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    idx = torch.tensor(PROMPT)
    assert (our_logits(model, idx).float() - hf_logits(hf, idx)).abs().max().item() < 0.5


# -- greedy generation ----------------------------------------------------------------------------------------------

def test_greedy_generation_matches_hugging_face(hf_model):
    hf, d = hf_model
    model, cfg = load_pretrained_gpt2(d, device="cpu")
    idx = torch.tensor(PROMPT[:1])
    theirs = hf.generate(idx, max_new_tokens=20, do_sample=False)
    from llm_from_scratch.gpt import generate_text_simple
    assert torch.equal(generate_text_simple(model, idx, 20, cfg["context_length"]), theirs)
    if importlib.util.find_spec("llm_from_scratch.generation") is None:
        pytest.skip("llm_from_scratch.generation (chapter 4's bonus page) is not there yet")
    from llm_from_scratch.generation import generate
    assert torch.equal(generate(model, idx, 20, cfg["context_length"]), theirs)


# -- the book's params layout and its checks ------------------------------------------------------------------------

def book_params(hf):
    "The nested dict of the book's load_gpt2_params_from_tf_ckpt, built from the Hugging Face model (squeezed)."
    params = {"blocks": [{} for _ in range(N_LAYER)]}
    for name, a in openai_arrays(hf).items():
        parts = name.split("/")[1:]
        target = params["blocks"][int(parts[0][1:])] if parts[0].startswith("h") else params
        for k in parts[1:-1]:
            target = target.setdefault(k, {})
        target[parts[-1]] = np.squeeze(a)
    return params


def test_load_weights_into_gpt_matches_and_copies(hf_model):
    hf, d = hf_model
    cfg = gpt2_config_from_hparams(json.loads((d/"config.json").read_text()))
    params = book_params(hf)
    model = load_weights_into_gpt(GPTModel(cfg), params).eval()
    idx = torch.tensor(PROMPT)
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-5
    # the parameters do not share memory with the caller's arrays
    params["wte"][:] = 0
    params["blocks"][0]["attn"]["c_attn"]["b"][:] = 0
    assert model.tok_emb.weight.abs().sum() > 0 and model.trf_blocks[0].att.W_key.bias.abs().sum() > 0
    # tie=False keeps a separate, equal head (the book's behaviour)
    untied = load_weights_into_gpt(GPTModel(cfg), book_params(hf), tie=False)
    assert untied.out_head.weight is not untied.tok_emb.weight
    assert torch.equal(untied.out_head.weight, untied.tok_emb.weight)
    n = sum(1 for _ in untied.named_parameters(remove_duplicate=False))
    assert n == len(gpt2_name_map(N_LAYER))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p["blocks"][1]["mlp"].pop("c_fc"), "model/h1/mlp/c_fc/w is missing"),
    (lambda p: p["blocks"][0]["attn"]["c_attn"].__setitem__("w", p["blocks"][0]["attn"]["c_attn"]["w"][:, :-3]),
     "model/h0/attn/c_attn/w has shape (64, 189)"),
    (lambda p: p.__setitem__("wpe", p["wpe"][:16]), "model/wpe has shape (16, 64)"),
    (lambda p: p["blocks"][0]["ln_1"].__setitem__("extra", np.zeros(3)), "model/h0/ln_1/extra is not a tensor of this model"),
    (lambda p: p["blocks"].pop(),
     "model/h1/attn/c_attn/w is missing (needed for trf_blocks.1.att.W_query.weight, trf_blocks.1.att.W_key.weight"),
])
def test_bad_params_are_named_and_nothing_is_loaded(hf_model, damage, message):
    hf, d = hf_model
    cfg = gpt2_config_from_hparams(json.loads((d/"config.json").read_text()))
    torch.manual_seed(2)
    model = GPTModel(cfg)
    before = state(model)
    params = book_params(hf)
    damage(params)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_weights_into_gpt(model, params)
    assert_unchanged(model, before)


def test_truncated_and_damaged_safetensors(hf_model, tmp_path):
    hf, d = hf_model
    data = (d/"model.safetensors").read_bytes()
    cfg = gpt2_config_from_hparams(json.loads((d/"config.json").read_text()))
    torch.manual_seed(3)
    model = GPTModel(cfg)
    before = state(model)
    for n, message in [(len(data) - 1, "truncated: tensor"), (100, "truncated or not a safetensors file"), (4, "not a safetensors file")]:
        p = tmp_path/f"cut{n}.safetensors"
        p.write_bytes(data[:n])
        with pytest.raises(ValueError, match=f"cut{n}.safetensors.*{message}"):
            load_gpt2_safetensors(model, p)
        assert_unchanged(model, before)
    # a tensor of the wrong shape in a complete file
    sd = load_file(d/"model.safetensors")
    sd["transformer.h.1.mlp.c_proj.weight"] = torch.zeros(N_EMBD, N_EMBD)
    save_file(sd, tmp_path/"wrong.safetensors")
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_proj.weight \(wrong.safetensors\) has shape \(64, 64\)"):
        load_gpt2_safetensors(model, tmp_path/"wrong.safetensors")
    assert_unchanged(model, before)
    # a missing tensor
    del sd["transformer.h.1.mlp.c_proj.weight"]
    save_file(sd, tmp_path/"missing.safetensors")
    with pytest.raises(ValueError, match="model/h1/mlp/c_proj/w is missing"):
        load_gpt2_safetensors(model, tmp_path/"missing.safetensors")
    assert_unchanged(model, before)


def test_truncated_pth_is_named(hf_model, tmp_path):
    _, d = hf_model
    model, _ = load_pretrained_gpt2(d, device="cpu")
    torch.save(model.state_dict(), tmp_path/"full.pth")
    data = (tmp_path/"full.pth").read_bytes()
    (tmp_path/"cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path/"config.json").write_text((d/"config.json").read_text())
    with pytest.raises(ValueError, match="cut.pth"):
        load_pretrained_gpt2(tmp_path/"cut.pth", device="cpu")


def test_names_and_sizes():
    assert gpt2_config("gpt2-xl (1558M)") == gpt2_config("1558M") == gpt2_config("gpt2-xl") == gpt2_config("openai-community/gpt2-xl")
    with pytest.raises(ValueError, match="neither a GPT-2 model name"):
        load_pretrained_gpt2("gpt2-999m")
    with pytest.raises(ValueError, match="Model size"):
        download_and_load_gpt2("1.5B")
    for m in PRETRAINED_GPT2.values():
        assert REGISTRY[m.name].filename == f"gpt2/{m.size}/model.safetensors"
        assert REGISTRY[f"{m.name}-openai/model.ckpt.index"].urls[1].startswith("https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/")


def test_offline_download_fails_clearly(monkeypatch):
    "Without the file anywhere local, and no network, the error says what to fetch and where to put it."
    import urllib.request

    def no_network(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DownloadError, match="model.safetensors"):
        load_pretrained_gpt2("gpt2-124m", device="cpu")


# -- OpenAI's TensorFlow checkpoint ---------------------------------------------------------------------------------

def write_openai_checkpoint(arrays: dict, folder, hparams: dict):
    "Write `arrays` as a TensorFlow checkpoint with exactly these variable names, plus OpenAI's other files."
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is needed to write and read OpenAI-style checkpoints")
    folder.mkdir(parents=True, exist_ok=True)
    g = tf.Graph()
    with g.as_default():
        variables = {n: tf.compat.v1.Variable(a, name=n.replace("/", "_")) for n, a in arrays.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=g) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            saver.save(s, str(folder/"model.ckpt"))
    (folder/"checkpoint").write_text('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
    (folder/"hparams.json").write_text(json.dumps(hparams))
    for f in ("encoder.json", "vocab.bpe"):
        (folder/f).write_text("{}")


HPARAMS = {"n_vocab": VOCAB, "n_ctx": N_CTX, "n_embd": N_EMBD, "n_head": N_HEAD, "n_layer": N_LAYER}


def test_openai_checkpoint_through_tensorflow(hf_model, tmp_path):
    pytest.importorskip("tensorflow", reason="TensorFlow is needed to write and read OpenAI-style checkpoints")
    hf, _ = hf_model
    arrays = openai_arrays(hf)
    assert arrays["model/h0/attn/c_attn/w"].shape == (1, N_EMBD, 3 * N_EMBD)
    models_dir = tmp_path/"gpt2"
    write_openai_checkpoint(arrays, models_dir/"124M", HPARAMS)
    # the book's function: the files are already in models_dir, so nothing is downloaded
    settings, params = download_and_load_gpt2("124M", models_dir)
    assert settings == HPARAMS
    assert sorted(params) == ["b", "blocks", "g", "wpe", "wte"]
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (N_EMBD, 3 * N_EMBD)
    model = load_weights_into_gpt(GPTModel(gpt2_config_from_hparams(settings)), params).eval()
    idx = torch.tensor(PROMPT)
    assert (our_logits(model, idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-5
    # and load_pretrained_gpt2 on the folder, with greedy generation equal to Hugging Face's
    m2, cfg = load_pretrained_gpt2(models_dir/"124M", device="cpu")
    assert (our_logits(m2, idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-5
    from llm_from_scratch.gpt import generate_text_simple
    ours = generate_text_simple(m2, idx[:1], 15, cfg["context_length"])
    assert torch.equal(ours, hf.generate(idx[:1], max_new_tokens=15, do_sample=False))

    # damaged checkpoints: a missing variable, a wrong shape, a truncated data file
    torch.manual_seed(4)
    victim = GPTModel(gpt2_config_from_hparams(settings))
    before = state(victim)
    missing = {k: v for k, v in arrays.items() if k != "model/h1/mlp/c_fc/b"}
    write_openai_checkpoint(missing, tmp_path/"missing", HPARAMS)
    with pytest.raises(ValueError, match="model/h1/mlp/c_fc/b is missing"):
        load_weights_into_gpt(victim, load_gpt2_params_from_tf_ckpt(tmp_path/"missing"/"model.ckpt", HPARAMS))
    wrong = {**arrays, "model/h0/mlp/c_proj/w": arrays["model/h0/mlp/c_proj/w"][:, :-1]}
    write_openai_checkpoint(wrong, tmp_path/"wrong", HPARAMS)
    with pytest.raises(ValueError, match=r"model/h0/mlp/c_proj/w has shape \(255, 64\)"):
        load_weights_into_gpt(victim, load_gpt2_params_from_tf_ckpt(tmp_path/"wrong"/"model.ckpt", HPARAMS))
    data = tmp_path/"wrong"/"model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: os.path.getsize(data) // 2])
    with pytest.raises(ValueError, match="model.ckpt"):
        load_pretrained_gpt2(tmp_path/"wrong", device="cpu")
    assert_unchanged(victim, before)
