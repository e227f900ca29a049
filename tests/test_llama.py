"Llama against `transformers`' LlamaForCausalLM (logits, greedy generation), the KV cache, loaders, configs and the tokenizer."
import base64
import json

import pytest
import tiktoken
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llm_from_scratch.generation import generate
from llm_from_scratch.llama import (
    LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, LLAMA32_CONFIG_1B, LLAMA_CONFIGS, ChatFormat, Llama2Model, Llama3Model,
    Llama3Tokenizer, llama_config_from_hf, load_llama3_tokenizer, load_pretrained_llama, load_weights_into_llama,
    read_tiktoken_ranks,
)
from llm_from_scratch.weights import init_empty_weights

from tiny_models import llama3_tokenizer_file, rel_err

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

transformers.utils.logging.disable_progress_bar()

SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}
CASES = {  # tiny random configs: GQA with 2 groups + Llama 3 scaling + tied head; MHA Llama 2 style untied; MQA with a wide head
    "gqa_llama32": {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500_000.0, "rope_scaling": SCALING,
                    "tie_word_embeddings": True},
    "mha_llama2": {"num_attention_heads": 4, "num_key_value_heads": 4, "rope_theta": 10_000.0, "tie_word_embeddings": False},
    "mqa_head_dim": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24, "rope_theta": 500_000.0,
                     "tie_word_embeddings": False},
}


def hf_llama(case, seed=0, **kw):
    cfg = LlamaConfig(**{"vocab_size": 101, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
                         "max_position_embeddings": 64, "rms_norm_eps": 1e-5, **CASES[case], **kw})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # random norms, so that a swapped norm weight would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
    return model


def saved_state_dict(hf):
    "The state dict as `save_pretrained` writes it: the tied head is not stored."
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for case in CASES:
        d = tmp_path_factory.mktemp(case)
        hf_llama(case).save_pretrained(d)
        out[case] = d
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, folders):
    hf = hf_llama(case)
    model, cfg = load_pretrained_llama(folders[case], device="cpu")
    assert model.cfg["n_kv_groups"] == CASES[case]["num_key_value_heads"]
    torch.manual_seed(1)
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        assert rel_err(model(idx), hf(idx).logits) < 1e-4
    assert (model.out_head.weight is model.tok_emb.weight) == CASES[case]["tie_word_embeddings"]


@pytest.mark.parametrize("case", CASES)
def test_state_dict_loader_matches_folder_loader(case, folders):
    hf = hf_llama(case)
    cfg = llama_config_from_hf(hf.config.to_dict())
    with init_empty_weights():
        model = Llama3Model(cfg)
    load_weights_into_llama(model, cfg, safetensors_torch.load_file(folders[case]/"model.safetensors"))
    idx = torch.randint(0, 101, (1, 17))
    with torch.no_grad():
        assert rel_err(model(idx), hf(idx).logits) < 1e-4
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("case", ["gqa_llama32", "mqa_head_dim"])
def test_greedy_generation_matches_transformers(case, folders):
    hf = hf_llama(case)
    model, _ = load_pretrained_llama(folders[case], device="cpu")
    torch.manual_seed(2)
    prompt = torch.randint(0, 101, (2, 9))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, max_new_tokens=24), ref)


def test_cache_token_identity_past_context_and_padding(tmp_path):
    hf_llama("gqa_llama32", max_position_embeddings=24).save_pretrained(tmp_path)
    model, _ = load_pretrained_llama(tmp_path, device="cpu")                  # context_length 24
    torch.manual_seed(3)
    prompt = torch.randint(0, 101, (1, 10))
    assert torch.equal(generate(model, prompt, 30), generate(model, prompt, 30, use_cache=False))
    short = torch.randint(0, 101, (1, 4))
    batch = torch.cat([prompt, torch.cat([torch.full((1, 6), 7), short], 1)])
    mask = torch.tensor([[1] * 10, [0] * 6 + [1] * 4])
    out = generate(model, batch, 12, attention_mask=mask)
    assert torch.equal(out[:1], generate(model, prompt, 12))
    assert torch.equal(out[1:, 10:], generate(model, short, 12)[:, 4:])


def test_sharded_folder_and_dtype(tmp_path):
    hf = hf_llama("mha_llama2")
    sd = saved_state_dict(hf)
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, keys in halves.items():
        safetensors_torch.save_file({k: sd[k].contiguous() for k in keys}, tmp_path/f)
    (tmp_path/"model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    (tmp_path/"config.json").write_text(hf.config.to_json_string())
    model, cfg = load_pretrained_llama(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert cfg["dtype"] == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    idx = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert rel_err(model(idx).float(), hf(idx).logits) < 5e-2
    (tmp_path/"model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks the shard"):
        load_pretrained_llama(tmp_path, device="cpu")


def _tiny(case="gqa_llama32"):
    hf = hf_llama(case)
    cfg = llama_config_from_hf(hf.config.to_dict())
    return hf, cfg, Llama3Model(cfg), saved_state_dict(hf)


def test_loader_refuses_and_changes_nothing():
    hf, cfg, model, sd = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(sd)
    bad.pop("model.layers.2.self_attn.k_proj.weight")
    bad["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 57)
    bad["model.layers.9.mlp.up_proj.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_weights_into_llama(model, cfg, bad)
    msg = str(e.value)
    assert "model.layers.2.self_attn.k_proj.weight is missing" in msg
    assert "model.layers.0.mlp.down_proj.weight has shape (32, 57)" in msg
    assert "model.layers.9.mlp.up_proj.weight is not a tensor of this model" in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="n_layers=2"):
        load_weights_into_llama(model, {**cfg, "n_layers": 2}, sd)
    with pytest.raises(ValueError, match="holds a ndarray"):
        load_weights_into_llama(model, cfg, {**sd, "model.norm.weight": sd["model.norm.weight"].numpy()})


def test_each_parameter_assigned_once_and_copied():
    hf, cfg, model, sd = _tiny("mha_llama2")
    load_weights_into_llama(model, cfg, sd)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert len({id(p) for p in params.values()}) == len(params)               # untied: every parameter its own tensor
    assert params["out_head.weight"].data_ptr() != sd["lm_head.weight"].data_ptr()   # a copy, not the caller's tensor
    sd["lm_head.weight"].zero_()
    assert params["out_head.weight"].abs().sum() > 0
    assert torch.equal(params["trf_blocks.1.ff.fc2.weight"], hf.model.layers[1].mlp.up_proj.weight)


def test_meta_build_and_inv_freq_tolerated():
    hf, cfg, _, sd = _tiny()
    sd["model.rotary_emb.inv_freq"] = torch.zeros(4)                          # some exports carry it: ignored
    with init_empty_weights():
        model = Llama3Model({**cfg, "dtype": torch.float16})
    load_weights_into_llama(model, cfg, sd)
    assert {p.dtype for p in model.parameters()} == {torch.float16} and model.cos.dtype == torch.float32


def test_config_from_hf_formats_and_refusals():
    v4 = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
          "num_hidden_layers": 16, "intermediate_size": 8192, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
                           "rope_type": "llama3"}, "tie_word_embeddings": True}
    cfg = llama_config_from_hf(v4)   # Meta's Llama 3.2 1B config.json (transformers 4 format)
    assert {k: cfg[k] for k in LLAMA32_CONFIG_1B} == LLAMA32_CONFIG_1B
    with pytest.raises(ValueError, match="attention_bias=True"):
        llama_config_from_hf({**v4, "attention_bias": True})
    with pytest.raises(ValueError, match="'qwen3' model"):
        llama_config_from_hf({**v4, "model_type": "qwen3"})
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        llama_config_from_hf({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="'num_hidden_layers'"):
        llama_config_from_hf({k: v for k, v in v4.items() if k != "num_hidden_layers"})


def test_param_counts_match_transformers_on_meta():
    "Llama 3.2 1B: the book's 1,498,482,688 counts the tied matrix twice; transformers' model has the unique 1,235,814,400."
    hf_cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True)
    with torch.device("meta"):
        ours, hf = Llama3Model(LLAMA32_CONFIG_1B), LlamaForCausalLM(hf_cfg)
    total = sum(p.numel() for p in ours.parameters())
    assert total == 1_498_482_688
    assert total - ours.tok_emb.weight.numel() == sum(p.numel() for p in hf.parameters()) == 1_235_814_400


def test_config_validation():
    tiny = {**LLAMA_CONFIGS["llama3.2-1b"], "vocab_size": 50, "emb_dim": 32, "n_heads": 4, "n_layers": 1, "hidden_dim": 40,
            "context_length": 16, "n_kv_groups": 2, "dtype": torch.float32}
    with pytest.raises(ValueError, match="'hidden_dim'"):
        Llama2Model({k: v for k, v in tiny.items() if k != "hidden_dim"})
    with pytest.raises(ValueError, match="'n_kv_groups' \\(3\\)"):
        Llama3Model({**tiny, "n_kv_groups": 3})
    with pytest.raises(ValueError, match="'n_layers' must be a positive integer"):
        Llama3Model({**tiny, "n_layers": 0})
    with pytest.raises(ValueError, match="'rope_freq' must be a dict"):
        Llama3Model({**tiny, "rope_freq": 8.0})
    with pytest.raises(ValueError, match="'low_freq_factor'"):
        Llama3Model({**tiny, "rope_freq": {"factor": 8.0}})
    with pytest.raises(ValueError, match="more than the model's context_length of 16"):
        Llama3Model(tiny)(torch.zeros(1, 17, dtype=torch.long))


# Tokenizer -------------------------------------------------------------------------------------------------------

LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    "A tiktoken-format file of GPT-2's first 3000 ranks, our tokenizer on it, and Hugging Face's tokenizer of the same file."
    path = llama3_tokenizer_file(tmp_path_factory.mktemp("tok")/"tokenizer.model", 3000)
    from transformers.convert_slow_tokenizer import TikTokenConverter
    backend = TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 chat_template=LLAMA3_CHAT_TEMPLATE)
    return _Files(path, Llama3Tokenizer(path), hf)


class _Files(tuple):
    "The tokenizer fixture, with a short repr (hypothesis prints its arguments)."
    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self):
        return "tok_files"


def test_special_tokens_layout(tok_files):
    path, tok, hf = tok_files
    assert tok.special["<|begin_of_text|>"] == 3000 and tok.special["<|eot_id|>"] == 3009
    assert len(tok.special) == 256 and max(tok.special.values()) == 3255 and tok.n_vocab == 3256
    for name, i in tok.special.items():
        assert hf.convert_tokens_to_ids(name) == i
    ids = tok.encode("hi<|eot_id|>there", allowed_special="all")
    assert tok.eot_id in ids and tok.decode(ids) == "hi<|eot_id|>there"
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id] + tok.encode("hi") + [tok.eos_id]


def test_meta_special_ids_with_full_vocabulary(tmp_path):
    "With Meta's 128 000 ranks the special tokens land on Llama 3's ids."
    path = tmp_path/"tokenizer.model"
    gpt2 = tiktoken.get_encoding("gpt2")
    lines = [f"{base64.b64encode(gpt2.decode_single_token_bytes(i)).decode()} {i}" for i in range(256)]
    lines += [f"{base64.b64encode(b'tok%d' % i).decode()} {i}" for i in range(256, 128_000)]   # filler ranks
    path.write_text("\n".join(lines))
    tok = Llama3Tokenizer(path)
    want = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
            "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|reserved_special_token_247|>": 128255}
    assert {k: tok.special[k] for k in want} == want


TEXT = st.text(alphabet=st.characters(categories=("L", "N", "P", "S", "Zs"), include_characters="\n\r\t '"), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_encoding_matches_hf_tokenizers(tok_files, text):
    _, tok, hf = tok_files
    assume("<|" not in text)   # special-token text is refused by design (see test_special_tokens_layout)
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


DIALOGS = [
    [{"role": "user", "content": "What do llamas eat?"}],
    [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": "  Hi!  "},
     {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "Name 3 animals,\nplease."}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 22+22?"},
     {"role": "assistant", "content": "44 — obviously."}, {"role": "user", "content": "Thanks, ça va."}],
]


@pytest.mark.parametrize("dialog", DIALOGS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_format_matches_hf_template(tok_files, dialog, gen):
    _, tok, hf = tok_files
    text = hf.apply_chat_template(dialog, tokenize=False, add_generation_prompt=gen)
    assert ChatFormat(tok).encode_dialog_prompt(dialog, add_generation_prompt=gen) == hf.encode(text, add_special_tokens=False)


def test_book_chat_encode(tok_files):
    _, tok, hf = tok_files
    chat = ChatFormat(tok)
    dialog = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    text = hf.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    assert chat.encode("Hi") == hf.encode(text, add_special_tokens=False)
    assert chat.encode("Hi", system_message="Be brief.") == chat.encode_dialog_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        chat.encode_message({"content": "x"})


def test_tokenizer_files(tok_files, tmp_path):
    path, _, _ = tok_files
    (tmp_path/"original").mkdir()
    (tmp_path/"original"/"tokenizer.model").write_bytes(path.read_bytes())
    assert load_llama3_tokenizer(tmp_path).n_vocab == 3256
    with pytest.raises(FileNotFoundError):
        Llama3Tokenizer(tmp_path/"nope.model")
    bad = tmp_path/"bad.model"
    bad.write_text("SGk= 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_tiktoken_ranks(bad)
    bad.write_text("SGk= 0\nSG8= 2\n")
    with pytest.raises(ValueError, match="ranks must be 0..1"):
        read_tiktoken_ranks(bad)
