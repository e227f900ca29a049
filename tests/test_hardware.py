"The memory estimate of nbs/92_hardware.ipynb against a measured training step, its breakdown, and bad input."
import pytest
import torch

from llm_from_scratch.gpt import GPT_CONFIG_124M, GPT_CONFIGS, GPTModel
from llm_from_scratch.hardware import (
    OPTIMIZER_STATES,
    count_gpt_parameters,
    estimate_training_memory,
    measure_training_memory,
)

SMALL = {"vocab_size": 1000, "context_length": 128, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.1, "qkv_bias": False}


@pytest.mark.parametrize("cfg, batch, kw", [
    (SMALL, 4, {}),
    ({**SMALL, "qkv_bias": True, "context_length": 256, "emb_dim": 128, "n_heads": 8}, 2, {"dtype": torch.bfloat16}),
    ({**SMALL, "vocab_size": 500, "context_length": 512, "drop_rate": 0.0}, 1, {}),
    ({**SMALL, "vocab_size": 5000, "context_length": 32, "emb_dim": 256}, 1, {"optimizer": "sgd_momentum"}),
])
def test_estimate_matches_measured_step(cfg, batch, kw):
    est = estimate_training_memory(cfg, batch, device="cpu", **kw)["total"]
    got = measure_training_memory(cfg, batch, **kw)
    assert abs(est / got - 1) < 0.15, (est, got)


@pytest.mark.parametrize("kw", [{}, {"mixed_precision": True}, {"dtype": torch.bfloat16}, {"optimizer": "sgd"}])
@pytest.mark.parametrize("batch", [1, 8])
def test_breakdown_sums_to_total(kw, batch):
    est = estimate_training_memory(GPT_CONFIG_124M, batch, 512, **kw)
    parts = {k: v for k, v in est.items() if k not in ("total", "peak_at")}
    assert set(parts) == {"weights", "buffers", "optimizer", "weight_copies", "gradients", "activations", "logits"}
    assert all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == est["total"]
    assert est["optimizer"] == OPTIMIZER_STATES[kw.get("optimizer", "adamw")] * est["weights"]


def test_parameter_count_matches_model():
    for cfg in GPT_CONFIGS.values():
        with torch.device("meta"):
            model = GPTModel({**cfg, "qkv_bias": True})
        assert count_gpt_parameters({**cfg, "qkv_bias": True}) == sum(p.numel() for p in model.parameters())


def test_estimate_grows_with_batch_and_context():
    totals = [estimate_training_memory(GPT_CONFIG_124M, b, 256)["total"] for b in (1, 2, 4, 8)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    assert estimate_training_memory(GPT_CONFIG_124M, 2, 1024)["total"] > estimate_training_memory(GPT_CONFIG_124M, 2, 256)["total"]


@pytest.mark.parametrize("args, kw, key", [
    (({**SMALL, "emb_dim": 0}, 1), {}, "emb_dim"),
    (({k: v for k, v in SMALL.items() if k != "n_heads"}, 1), {}, "n_heads"),
    ((SMALL, 0), {}, "batch_size"),
    ((SMALL, 2), {"context_length": 4096}, "context_length"),
    ((SMALL, 2), {"optimizer": "lion"}, "optimizer"),
    ((SMALL, 2), {"device": "tpu"}, "device"),
])
def test_bad_input_names_the_key(args, kw, key):
    with pytest.raises(ValueError, match=key):
        estimate_training_memory(*args, **kw)
    with pytest.raises(ValueError, match=key):
        measure_training_memory(*args, **kw)
