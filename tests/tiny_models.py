"""Tiny random models and tokenizer files shared by the tests and `bench/generate.py`.

Builders only: nothing here asserts. The tokenizers are small but in the real formats (Qwen3's and Gemma 3's
`tokenizer.json`, Llama 3's tiktoken `tokenizer.model`), so the package's tokenizer classes read them as they read the
released files.
"""
import base64
import json
from pathlib import Path

import time

import torch
from torch import nn

# Qwen3's pre-tokenizer regex (its tokenizer.json), used by the tiny Qwen3 tokenizer
QWEN3_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CORPUS = ["Hello world! How are you doing today? I think, therefore I am.", "The quick brown fox jumps over the lazy dog 12345."] * 10


def unit_scale(model, seed=0):
    "Weights of unit-scale activations (matrices ~ 1/sqrt(fan_in), norm weights near their init +- 0.1), so greedy tokens are no near-ties."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def rel_err(a, b):
    "The largest absolute difference relative to the largest magnitude of the reference `b`."
    return ((a - b).abs().max() / b.abs().max()).item()


class SlowModel(nn.Module):
    "A model that sleeps before every forward pass, so that a stream's tokens are spread out in time."
    def __init__(self, inner, delay=0.04):
        super().__init__()
        self.inner, self.cfg, self.delay = inner, inner.cfg, delay

    def forward(self, idx, cache=None):
        time.sleep(self.delay)
        return self.inner(idx, cache=cache)


def qwen3_tokenizer_file(path, texts=CORPUS):
    "Write a small byte-level BPE in Qwen3's format with Qwen3's special tokens (ids after the ~350 learned ones) to `path`."
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN3_PRETOKENIZE), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ["<think>", "</think>"]])
    tok.save(str(path))
    return Path(path)


def gemma3_tokenizer_file(path, texts=CORPUS):
    "Write a small SentencePiece-style BPE with byte fallback, Gemma's special tokens and its <bos> template (~460 ids) to `path`."
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "▁")
    base.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    base.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False))
    learned = json.loads(base.to_str())["model"]
    vocab = learned["vocab"] | {f"<0x{b:02X}>": len(learned["vocab"]) + b for b in range(256)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer, tok.pre_tokenizer = base.normalizer, base.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + ["<start_of_turn>", "<end_of_turn>"]])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    tok.save(str(path))
    return Path(path)


def llama3_tokenizer_file(path, n_ranks=3000):
    "Write a tiktoken-format `tokenizer.model` of GPT-2's first `n_ranks` ranks to `path` (Llama 3's specials follow: n_ranks + 256 ids)."
    import tiktoken
    gpt2 = tiktoken.get_encoding("gpt2")
    Path(path).write_text("".join(f"{base64.b64encode(gpt2.decode_single_token_bytes(i)).decode()} {i}\n" for i in range(n_ranks)))
    return Path(path)


# Tiny Hugging Face folders: a random transformers model saved with save_pretrained (safetensors, float32) and its tokenizer files.
# vocab_size covers the tiny tokenizer's ids; the weights are unit-scale so that greedy decoding has no near-ties.

def gpt2_folder(folder, seed=0):
    "A tiny random GPT2LMHeadModel (GPT-2's 50,257-token vocabulary, for tiktoken) saved in `folder`; returns the model."
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, vocab_size=50257)
    hf = unit_scale(transformers.GPT2LMHeadModel(cfg), seed).eval()
    hf.save_pretrained(folder)
    return hf


def qwen3_folder(folder, seed=0):
    "A tiny random Qwen3ForCausalLM (GQA 4/2, tied embeddings) with a tiny Qwen3 tokenizer.json, saved in `folder`."
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True)
    hf = unit_scale(transformers.Qwen3ForCausalLM(cfg), seed).eval()
    hf.save_pretrained(folder)
    qwen3_tokenizer_file(Path(folder)/"tokenizer.json")
    return hf


def llama3_folder(folder, seed=0):
    "A tiny random LlamaForCausalLM (GQA 4/2, Llama 3 RoPE scaling, tied) with a tiny original/tokenizer.model, saved in `folder`."
    import transformers
    torch.manual_seed(seed)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    cfg = transformers.LlamaConfig(vocab_size=3264, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500_000.0,
                                   rope_scaling=scaling, tie_word_embeddings=True)
    hf = unit_scale(transformers.LlamaForCausalLM(cfg), seed).eval()
    hf.save_pretrained(folder)
    (Path(folder)/"original").mkdir(exist_ok=True)
    llama3_tokenizer_file(Path(folder)/"original"/"tokenizer.model")
    return hf


def gemma3_folder(folder, seed=0):
    "A tiny random Gemma3ForCausalLM (window 4: 3 local layers, 1 global) with a tiny Gemma tokenizer.json, saved in `folder`."
    import transformers
    torch.manual_seed(seed)
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    cfg = transformers.Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=32, sliding_window=4, rope_parameters=rope,
                                        query_pre_attn_scalar=24, max_position_embeddings=64,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
    hf = unit_scale(transformers.Gemma3ForCausalLM(cfg), seed).eval()
    hf.save_pretrained(folder)
    gemma3_tokenizer_file(Path(folder)/"tokenizer.json")
    return hf


class Interrupting(torch.utils.data.Dataset):
    "Windows that raise KeyboardInterrupt when item number `after` is read (a crash in the middle of a step)."
    def __init__(self, data, after):
        self.data, self.after, self.reads = data, after, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.after:
            raise KeyboardInterrupt
        return self.data[i]
