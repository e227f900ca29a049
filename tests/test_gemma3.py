"Gemma 3 against Hugging Face transformers (tiny random models with sliding windows), the KV cache, the loaders and the tokenizer."
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from llm_from_scratch.gemma3 import (GEMMA3_CONFIG_270M, GEMMA3_CONFIG_4B, GEMMA3_HF_DEFAULTS, Gemma3Block, Gemma3Model,
                                     GemmaTokenizer, apply_chat_template, check_gemma3_config, gemma3_chat_text, gemma3_config_from_hf,
                                     gemma3_layer_types, load_gemma3_tokenizer, load_pretrained_gemma3, load_weights_into_gemma)
from llm_from_scratch.generation import generate
from llm_from_scratch.layers import RMSNorm
from llm_from_scratch.weights import init_empty_weights

from tiny_models import gemma3_tokenizer_file, rel_err, unit_scale

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 97
TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _hf_config(linear: bool = False, window: int = 4, **kw):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    if linear:
        rope["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    args = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "sliding_window": window, "layer_types": TYPES, "rope_parameters": rope,
            "query_pre_attn_scalar": 24, "max_position_embeddings": 48, "attn_implementation": "eager"} | kw
    return transformers.Gemma3TextConfig(**args)


def _hf_gemma3(seed=0, **kw):
    torch.manual_seed(seed)
    return unit_scale(transformers.Gemma3ForCausalLM(_hf_config(**kw)), seed).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["default-rope", "linear-rope"])
def hf_and_folder(request, tmp_path_factory):
    "A tiny random transformers Gemma 3 (window 4, 3 local layers and 1 global) and the folder save_pretrained wrote."
    hf = _hf_gemma3(linear=request.param)
    folder = tmp_path_factory.mktemp("gemma3") / "tiny-gemma-3"
    hf.save_pretrained(folder)
    return hf, folder


def test_logits_match_transformers(hf_and_folder):
    hf, folder = hf_and_folder
    model, cfg = load_pretrained_gemma3(folder, device="cpu", dtype=torch.float32)
    assert cfg["layer_types"] == TYPES and cfg["sliding_window"] == 4 and cfg["n_kv_groups"] == 2
    assert "lm_head.weight" not in load_file(folder / "model.safetensors") and model.out_head.weight is model.tok_emb.weight
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 12))           # three times the window
    with torch.no_grad():
        ours, ref = model(idx), hf(idx).logits
    assert rel_err(ours, ref) < 1e-4


def test_greedy_generation_matches_transformers_past_the_window(hf_and_folder):
    hf, folder = hf_and_folder
    model, _ = load_pretrained_gemma3(folder, device="cpu", dtype=torch.float32)
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (1, 6))
    ref = hf.generate(idx, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, idx, 30), ref)


def test_cached_equals_uncached_past_window_and_context(hf_and_folder):
    _, folder = hf_and_folder
    model, cfg = load_pretrained_gemma3(folder, device="cpu", dtype=torch.float32)
    idx = (torch.arange(7)[None] * 5) % VOCAB
    n = cfg["context_length"] + 3   # the last 3 steps re-feed a full context
    assert torch.equal(generate(model, idx, n), generate(model, idx, n, use_cache=False))


def test_bfloat16_close_to_transformers():
    "In bfloat16 (the released dtype) the outputs stay close; the embedding scale is rounded to bfloat16 as transformers does."
    hf = _hf_gemma3(seed=3).to(torch.bfloat16)
    cfg = gemma3_config_from_hf(hf.config.to_dict()) | {"dtype": torch.bfloat16}
    with init_empty_weights():
        model = Gemma3Model(cfg)
    load_weights_into_gemma(model, cfg, hf.state_dict())
    idx = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        ours, ref = model.eval()(idx).float(), hf(idx).logits.float()
    assert rel_err(ours, ref) < 3e-2


def test_norms_match_transformers():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    ref = Gemma3RMSNorm(16)
    ours = RMSNorm(16, eps=1e-6, unit_offset=True)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    assert torch.equal(ours(x), ref(x))
    block = Gemma3Block({**GEMMA3_CONFIG_270M, "dtype": torch.float32}, "full_attention")
    assert block.norm1 is block.input_layernorm and block.norm2 is block.pre_feedforward_layernorm


def test_multimodal_checkpoint(tmp_path):
    "The language model of a Gemma3ForConditionalGeneration folder (tiny vision tower) loads and matches on text."
    text = _hf_config().to_dict()
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28,
              "patch_size": 14}
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                                    boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, attn_implementation="eager")
    torch.manual_seed(4)
    hf = unit_scale(transformers.Gemma3ForConditionalGeneration(cfg), 4).eval()
    hf.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any("vision" in k for k in keys) and any("language_model" in k for k in keys)
    model, ours_cfg = load_pretrained_gemma3(tmp_path, device="cpu", dtype=torch.float32)
    assert ours_cfg["layer_types"] == TYPES
    idx = torch.randint(0, VOCAB - 3, (1, 11))
    with torch.no_grad():
        assert rel_err(model(idx), hf(input_ids=idx).logits) < 1e-4


def test_config_from_hf_formats():
    "transformers 5 (rope_parameters per layer type) and 4 (rope_theta, rope_local_base_freq, rope_scaling, a pattern) agree."
    v5 = gemma3_config_from_hf(_hf_config(linear=True).to_dict())
    v4 = {k: v for k, v in _hf_config().to_dict().items() if k not in ("rope_parameters", "layer_types")}
    v4 |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
           "sliding_window_pattern": 3}
    assert gemma3_config_from_hf(v4) == v5 and v5["rope_freq"] == {"rope_type": "linear", "factor": 8.0}
    assert gemma3_config_from_hf(json.loads(transformers.Gemma3TextConfig().to_json_string()))["layer_types"] == gemma3_layer_types(26)
    for change, key in [({"hidden_activation": "gelu"}, "hidden_activation"), ({"final_logit_softcapping": 30.0}, "softcapping"),
                        ({"model_type": "llama"}, "not Gemma 3"), ({"use_bidirectional_attention": True}, "bidirectional")]:
        with pytest.raises(ValueError, match=key):
            gemma3_config_from_hf({**v4, **change})


def test_defaults_match_transformers():
    d = transformers.Gemma3TextConfig().to_dict()
    rope = d["rope_parameters"]
    for k, v in GEMMA3_HF_DEFAULTS.items():
        if k == "rope_theta":
            assert rope["full_attention"]["rope_theta"] == v
        elif k == "rope_local_base_freq":
            assert rope["sliding_attention"]["rope_theta"] == v
        elif k == "sliding_window_pattern":
            assert d["layer_types"] == gemma3_layer_types(d["num_hidden_layers"], v)
        else:
            assert d[k] == v, k
    sparse_4b = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                                                          "num_hidden_layers": 34, "sliding_window": 1024,
                                                          "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
                 "torch_dtype": "bfloat16"}
    assert gemma3_config_from_hf(sparse_4b) == GEMMA3_CONFIG_4B


def test_loader_errors_change_nothing(tmp_path):
    hf = _hf_gemma3(seed=5)
    sd = dict(hf.state_dict())
    cfg = gemma3_config_from_hf(hf.config.to_dict()) | {"dtype": torch.float32}
    torch.manual_seed(0)
    model = Gemma3Model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: v for k, v in sd.items() if k != "model.layers.1.post_feedforward_layernorm.weight"}
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError) as e:
        load_weights_into_gemma(model, cfg, bad)
    assert "model.layers.1.post_feedforward_layernorm.weight is missing" in str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="n_layers"):
        load_weights_into_gemma(model, {**cfg, "n_layers": 3}, sd)


def test_config_checks():
    for bad, key in [({"layer_types": ["global"] * 18}, "layer_types"), ({"n_kv_groups": 3}, "n_kv_groups"),
                     ({"head_dim": 255}, "head_dim"), ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar")]:
        with pytest.raises(ValueError, match=key):
            check_gemma3_config({**GEMMA3_CONFIG_270M, **bad})
    with pytest.raises(ValueError, match="attn_type"):
        Gemma3Block({**GEMMA3_CONFIG_270M, "dtype": torch.float32}, "local")
    small = {**GEMMA3_CONFIG_270M, "vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_layers": 1, "hidden_dim": 8,
             "head_dim": 4, "layer_types": ["full_attention"], "dtype": torch.float32}
    with pytest.raises(ValueError, match="context_length"):
        Gemma3Model(small)(torch.zeros(1, 9, dtype=torch.long))


# ---- tokenizer and chat template ----

# Gemma 3's chat template (tokenizer_config.json of google/gemma-3-270m-it), the reference our Python template must match.
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

TEXT = ["Hello world! How are you doing today? I think, therefore I am.", "The quick brown fox jumps over the lazy dog 12345."] * 10
CONVERSATIONS = [
    [{"role": "user", "content": " Hi "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there\n"},
     {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "\nQ2 with ünïcödé\n"},
     {"role": "assistant", "content": "A2"}],
]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    "A small SentencePiece-style BPE with byte fallback, Gemma's special tokens and its <bos> template."
    return gemma3_tokenizer_file(tmp_path_factory.mktemp("gemmatok") / "tokenizer.json", TEXT)


@pytest.fixture(scope="module")
def reference(tok_file):
    from tokenizers import Tokenizer
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tok_file)), chat_template=GEMMA3_CHAT_TEMPLATE,
                                                bos_token="<bos>")


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_jinja(tok_file, reference, conv, add_generation_prompt):
    assert gemma3_chat_text(conv, add_generation_prompt) == reference.apply_chat_template(conv, tokenize=False,
                                                                                         add_generation_prompt=add_generation_prompt)
    ref_ids = reference.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt)
    ref_ids = list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    assert GemmaTokenizer(tok_file).encode_chat(conv, add_generation_prompt) == ref_ids


def test_book_prompt_and_special_ids(tok_file):
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(str(tok_file))
    tok = load_gemma3_tokenizer(tok_file.parent)
    assert tok.encode(apply_chat_template("Hi")) == tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert tok.encode("x")[0] == tok.bos_token_id == t.token_to_id("<bos>")
    assert tok.eos_token_id == t.token_to_id("<end_of_turn>") and tok.pad_token_id == t.token_to_id("<pad>")
    assert tok.encode("<start_of_turn>", add_bos=False) == [t.token_to_id("<start_of_turn>")]
    with pytest.raises(ValueError, match="alternate"):
        gemma3_chat_text([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="No tokenizer file"):
        GemmaTokenizer(tok_file.parent / "missing.json")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_round_trip(tok_file, text):
    tok = GemmaTokenizer(tok_file)
    if "▁" in text or any(s in text for s in ("<pad>", "<eos>", "<bos>", "<unk>", "_turn>")):
        return   # SentencePiece writes spaces as ▁, so a ▁ in the text comes back as a space; special tokens become ids
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.decode(tok.encode(text)) == "<bos>" + text
