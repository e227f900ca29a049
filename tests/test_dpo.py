"Direct preference optimization (chapter 7 bonus): the loss against the paper's formula, masks, the training loop, the CLI."
import argparse
import contextlib
import io
import json
import math

import pytest
import tiktoken
import torch
from torch.utils.data import DataLoader

from llm_from_scratch.dpo import (
    PreferenceDataset,
    add_cli_parser,
    compute_dpo_loss,
    compute_dpo_loss_batch,
    compute_dpo_loss_loader,
    compute_logprobs,
    preference_collate_fn,
    finetune_dpo,
    load_preference_data,
    train_model_dpo_simple,
)
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.instruct import format_input
from llm_from_scratch.trainer import load_checkpoint, model_from_checkpoint, save_checkpoint

TINY = {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}
PAIRS = [  # short handmade preference pairs: polite (chosen) and curt (rejected)
    {"instruction": "Name a color.", "input": "", "chosen": "Blue is a lovely color.", "rejected": "Blue. Obviously."},
    {"instruction": "Say hello.", "input": "", "chosen": "Hello, nice to meet you!", "rejected": "What do you want?"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "The sum is 5.", "rejected": "5, duh."},
    {"instruction": "Give a synonym.", "input": "happy", "chosen": "A synonym is joyful.", "rejected": "Joyful, look it up."},
]


def tiny_pair(seed=0):
    "A tiny GPT and an identical copy, dropout off."
    torch.manual_seed(seed)
    policy = GPTModel(TINY)
    reference = GPTModel(TINY)
    reference.load_state_dict(policy.state_dict())
    return policy, reference.eval()


def paper_dpo_loss(pc, pr, rc, rr, beta):
    "−log σ(β((πc−rc)−(πr−rr))), element by element in float64 with math's functions (the DPO paper's eq. 7)."
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = beta * ((a - c) - (b - d))
        out.append(math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z)))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_loss_matches_paper_formula(beta):
    g = torch.Generator().manual_seed(int(beta * 100))
    pc, pr, rc, rr = (-5 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    loss, chosen, rejected = compute_dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(paper_dpo_loss(pc, pr, rc, rr, beta), rel=1e-12)
    assert chosen.item() == pytest.approx((pc - rc).mean().item())
    assert rejected.item() == pytest.approx((pr - rr).mean().item())


def test_large_logits_do_not_overflow():
    pc, pr = torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0])
    zeros = torch.zeros(2)
    loss, _, _ = compute_dpo_loss(pc, pr, zeros, zeros, beta=1.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1e4 / 2, rel=1e-6)  # one pair right (loss ~0), one wrong by 1e4


def test_policy_equal_to_reference_gives_ln2_and_zero_margin():
    tok = tiktoken.get_encoding("gpt2")
    policy, reference = tiny_pair()
    batch = preference_collate_fn(list(PreferenceDataset(PAIRS, tok)))
    for beta in (0.1, 1.0):
        loss, chosen, rejected = compute_dpo_loss_batch(batch, policy, reference, beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert chosen.item() == pytest.approx(0.0, abs=1e-6) and rejected.item() == pytest.approx(0.0, abs=1e-6)


def test_compute_logprobs_against_cross_entropy():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    mask = torch.rand(3, 7) > 0.4
    mask[:, 1] = True  # at least one selected prediction per row
    got = compute_logprobs(logits, labels, mask)
    for i in range(3):
        sel = mask[i, 1:]
        ce = torch.nn.functional.cross_entropy(logits[i, :-1][sel], labels[i, 1:][sel])
        assert got[i].item() == pytest.approx(-ce.item(), rel=1e-5)
    assert torch.allclose(compute_logprobs(logits, labels), compute_logprobs(logits, labels, torch.ones(3, 7, dtype=torch.bool)))


def test_masked_positions_do_not_contribute():
    "Changing the logits (even to ±inf) where the mask selects no prediction leaves the log-probabilities unchanged."
    tok = tiktoken.get_encoding("gpt2")
    batch = preference_collate_fn(list(PreferenceDataset(PAIRS, tok)))
    torch.manual_seed(2)
    for key in ("chosen", "rejected"):
        ids, mask = batch[key], batch[f"{key}_mask"]
        b, T = ids.shape
        logits = torch.randn(b, T, 50257)
        base = compute_logprobs(logits, ids, mask)
        unused = ~mask[:, 1:]              # predictions not selected: the prompt's (+2) and the padding's
        changed = logits.clone()
        changed[:, :-1][unused] = 50 * torch.randn(int(unused.sum()), 50257)
        changed[:, -1] = float("inf")     # the last position predicts nothing at all
        assert torch.equal(compute_logprobs(changed, ids, mask), base)
        # ... but changing a selected position does change it
        i, t = torch.nonzero(mask[:, 1:])[0].tolist()
        changed[i, t, ids[i, t + 1]] += 5.0
        assert not torch.equal(compute_logprobs(changed, ids, mask), base)


def test_prompt_counts_only_when_not_masked():
    tok = tiktoken.get_encoding("gpt2")
    items = list(PreferenceDataset(PAIRS, tok))
    masked, unmasked = preference_collate_fn(items), preference_collate_fn(items, mask_prompt_tokens=False)
    torch.manual_seed(3)
    logits = torch.randn(*masked["chosen"].shape, 50257)
    n_prompt = len(items[0]["prompt"])
    changed = logits.clone()
    changed[0, :n_prompt - 1] += 10 * torch.randn(n_prompt - 1, 50257)  # predictions of prompt tokens 1..n_prompt-1
    assert torch.equal(compute_logprobs(changed, masked["chosen"], masked["chosen_mask"])[0],
                       compute_logprobs(logits, masked["chosen"], masked["chosen_mask"])[0])
    assert not torch.equal(compute_logprobs(changed, unmasked["chosen"], unmasked["chosen_mask"])[0],
                           compute_logprobs(logits, unmasked["chosen"], unmasked["chosen_mask"])[0])


def test_empty_selection_gives_zero_not_nan():
    logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]).bool()  # row 1 selects no prediction (only position 0)
    out = compute_logprobs(logits, labels, mask)
    assert torch.isfinite(out).all() and out[1].item() == 0.0


def test_collate_on_handmade_examples():
    batch = [{"prompt": [5, 6, 7], "chosen": [5, 6, 7, 1, 1, 8, 8], "rejected": [5, 6, 7, 1, 1, 9]},
             {"prompt": [5], "chosen": [5, 1, 1, 4], "rejected": [5, 1, 1, 3, 3, 3, 3, 3]}]
    out = preference_collate_fn(batch, pad_token_id=0)
    T = 8 + 1  # the longest sequence (8) plus one
    assert out["chosen"].shape == out["rejected"].shape == out["chosen_mask"].shape == (2, T)
    assert out["chosen"][0].tolist() == [5, 6, 7, 1, 1, 8, 8, 0, 0]
    assert out["chosen_mask"][0].tolist() == [False] * 5 + [True] * 2 + [False] * 2
    assert out["rejected_mask"][0].tolist() == [False] * 5 + [True] + [False] * 3
    assert out["chosen_mask"][1].tolist() == [False] * 3 + [True] + [False] * 5
    assert out["rejected_mask"][1].tolist() == [False] * 3 + [True] * 5 + [False]
    assert [p.tolist() for p in out["prompt"]] == [[5, 6, 7], [5]]
    plain = preference_collate_fn(batch, pad_token_id=0, mask_prompt_tokens=False)
    assert plain["chosen_mask"][0].tolist() == [True] * 7 + [False] * 2
    assert torch.equal(plain["chosen"], out["chosen"])
    cut = preference_collate_fn(batch, pad_token_id=0, allowed_max_length=6)
    assert cut["rejected"].shape == cut["rejected_mask"].shape == (2, 6)
    assert torch.equal(cut["rejected_mask"], out["rejected_mask"][:, :6])
    with pytest.raises(ValueError, match="empty"):
        preference_collate_fn([])
    with pytest.raises(ValueError, match="allowed_max_length"):
        preference_collate_fn(batch, allowed_max_length=1)


def test_dataset_token_layout():
    tok = tiktoken.get_encoding("gpt2")
    ds = PreferenceDataset(PAIRS, tok)
    assert len(ds) == 4
    for entry, item in zip(PAIRS, ds):
        assert tok.decode(item["prompt"]) == format_input(entry)
        assert tok.decode(item["rejected"]) == format_input(entry) + "\n\n### Response:\n" + entry["rejected"]
        out = preference_collate_fn([item])
        assert tok.decode(out["chosen"][0][out["chosen_mask"][0]].tolist()) == "### Response:\n" + entry["chosen"]


def test_training_leaves_reference_alone_and_raises_margin():
    tok = tiktoken.get_encoding("gpt2")
    policy, reference = tiny_pair(seed=4)
    assert all(p.requires_grad for p in reference.parameters())  # not frozen: the loss itself must not train it
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.manual_seed(5)
    loader = DataLoader(PreferenceDataset(PAIRS, tok), batch_size=2, shuffle=True, collate_fn=preference_collate_fn)
    eval_loader = DataLoader(PreferenceDataset(PAIRS, tok), batch_size=4, collate_fn=preference_collate_fn)
    start = compute_dpo_loss_loader(eval_loader, policy, reference, beta=0.1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-3)
    with contextlib.redirect_stdout(io.StringIO()):
        tracking = train_model_dpo_simple(policy, reference, loader, eval_loader, optimizer, num_epochs=5, beta=0.1,
                                          eval_freq=2, eval_iter=1, start_context="Hi", tokenizer=tok)
    end = compute_dpo_loss_loader(eval_loader, policy, reference, beta=0.1)
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert all(p.grad is None for p in reference.parameters())
    assert start[0] == pytest.approx(math.log(2), abs=1e-6) and start[1] - start[2] == pytest.approx(0, abs=1e-6)
    assert end[1] - end[2] > 0.5 and end[0] < 0.67  # margin up (0 -> ~0.95), loss down from ln 2 = 0.693
    margins = [c - r for c, r in zip(tracking["train_chosen_rewards"], tracking["train_rejected_rewards"])]
    assert len(margins) == 5 and margins[-1] > margins[0]
    assert len(tracking["tokens_seen"]) == 5 and tracking["tokens_seen"] == sorted(tracking["tokens_seen"])


def test_loader_loss_is_the_mean_of_batches():
    tok = tiktoken.get_encoding("gpt2")
    policy, reference = tiny_pair(seed=6)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loader = DataLoader(PreferenceDataset(PAIRS, tok), batch_size=2, collate_fn=preference_collate_fn)
    with torch.no_grad():
        per_batch = [compute_dpo_loss_batch(b, policy, reference, 0.1) for b in loader]
        got = compute_dpo_loss_loader(loader, policy, reference, 0.1)
        first = compute_dpo_loss_loader(loader, policy, reference, 0.1, num_batches=1)
    assert got[0] == pytest.approx(sum(x[0].item() for x in per_batch) / 2, rel=1e-6)
    assert first[0] == pytest.approx(per_batch[0][0].item(), rel=1e-6)
    assert compute_dpo_loss_loader(loader, policy, reference, 0.1, num_batches=99)[0] == pytest.approx(got[0], rel=1e-6)
    assert all(math.isnan(x) for x in compute_dpo_loss_loader([], policy, reference, 0.1))


def test_train_rejects_bad_settings():
    policy, reference = tiny_pair()
    opt = torch.optim.AdamW(policy.parameters())
    with pytest.raises(ValueError, match="eval_freq"):
        train_model_dpo_simple(policy, reference, [1], [1], opt, 1, 0.1, 0, 1, "Hi", None)
    with pytest.raises(ValueError, match="no batches"):
        train_model_dpo_simple(policy, reference, [], [], opt, 1, 0.1, 1, 1, "Hi", None)


def test_load_preference_data(tmp_path):
    data = load_preference_data()
    assert len(data) == 1100 and all({"instruction", "chosen", "rejected"} <= set(e) for e in data)
    (tmp_path/"bad.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preference_data(tmp_path/"bad.json")
    with pytest.raises(ValueError, match="entry 1 has no 'chosen'"):
        load_preference_data([PAIRS[0], {"instruction": "x", "rejected": "y"}])
    with pytest.raises(ValueError, match="not a string"):
        load_preference_data([{**PAIRS[0], "input": 3}])


def _parser():
    p = argparse.ArgumentParser(prog="llm-from-scratch")
    add_cli_parser(p.add_subparsers(dest="command"))
    return p


def test_cli_finetune_dpo_end_to_end(tmp_path):
    from llm_from_scratch.cli import load_model_for_cli
    base = tmp_path/"base"
    torch.manual_seed(8)
    save_checkpoint(base, GPTModel(TINY), {"step": 0}, {"model": TINY, "tokenizer": "gpt2"})
    (tmp_path/"pairs.json").write_text(json.dumps(PAIRS * 5))  # 20 entries: 17 train, 2 test, 1 validation
    args = _parser().parse_args(["finetune-dpo", str(base), "--data", str(tmp_path/"pairs.json"), "--batch-size", "4",
                                 "--epochs", "1", "--lr", "1e-3", "--beta", "0.5", "--out", str(tmp_path/"dpo"),
                                 "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    ckpt = load_checkpoint(tmp_path/"dpo")
    assert ckpt["path"].name == "step-00000004"  # 1 epoch of 17 // 4 = 4 batches
    dpo = ckpt["config"]["dpo"]
    assert (dpo["beta"], dpo["epochs"], dpo["lr"], dpo["allowed_max_length"]) == (0.5, 1, 1e-3, 64)
    assert ckpt["config"]["model"] == TINY and ckpt["config"]["tokenizer"] == "gpt2"
    model, tok = load_model_for_cli(argparse.Namespace(checkpoint=tmp_path/"dpo", model=None, device="cpu"))
    original = model_from_checkpoint(base)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


@pytest.mark.parametrize("argv, message", [
    (["--beta", "0"], "--beta must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--data", "/nonexistent/pairs.json"], "no such preference data file"),
])
def test_cli_rejects_bad_input(tmp_path, argv, message):
    from llm_from_scratch.cli import CLIError
    args = _parser().parse_args(["finetune-dpo", str(tmp_path), *argv])
    with pytest.raises(CLIError, match=message):
        args.func(args)


def test_cli_bad_base_and_bad_data(tmp_path):
    from llm_from_scratch.cli import CLIError
    (tmp_path/"pairs.json").write_text(json.dumps([{"instruction": "x"}]))
    args = _parser().parse_args(["finetune-dpo", str(tmp_path/"nowhere"), "--data", str(tmp_path/"pairs.json")])
    with pytest.raises(CLIError, match="no 'chosen'"):
        args.func(args)
    (tmp_path/"pairs.json").write_text(json.dumps(PAIRS * 5))
    args = _parser().parse_args(["finetune-dpo", str(tmp_path/"nowhere"), "--data", str(tmp_path/"pairs.json")])
    with pytest.raises(CLIError, match="nowhere"):
        args.func(args)
    with pytest.raises(ValueError, match="too few"):
        finetune_dpo(tmp_path/"nowhere", PAIRS, batch_size=8)
