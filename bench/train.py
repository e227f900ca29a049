"""Training throughput of our GPT against the book's and Hugging Face's GPT-2 (nbs/05c_training_at_scale.ipynb).

    python bench/train.py                                # 124M (context 256, batch 8) and a small config; fp32, then bf16
    python bench/train.py --configs small --steps 5      # one config, more timed steps
    python bench/train.py --device cuda --compile        # a GPU: bf16 autocast, torch.compile, flash attention; MFU

One training step is forward, loss, backward and AdamW step, on the same batches for every implementation:

- ours: GPTModel with attn_impl='sdpa' and use_fused_kernels (PyTorch's fused LayerNorm and GELU: the same math),
  stepped by Trainer.train_step (fused AdamW, matrices-only weight decay, zero_grad(set_to_none=True)); with --compile
  also a torch.compile'd copy;
- book: chapter 4's GPTModel (the book's attention), stepped by chapter 5's loop
  (AdamW(model.parameters(), lr=4e-4, weight_decay=0.1), zero_grad, calc_loss_batch, backward, step);
- transformers: GPT2LMHeadModel with the same config, random weights, attn_implementation='sdpa', the same loss and
  the same fused AdamW as ours.

Each implementation is built, warmed up and timed in turn, then freed before the next (three 124M models with
their optimizer states need more memory than a laptop may have), in rounds of alternating order; the table gives the
median step. Throughput is tokens per second; the speed-ups are against the book's model and against transformers at
the same precision.
Achieved FLOP/s counts 6N + 12 L T d FLOPs per token (N: parameters that multiply activations, every parameter but
the two embedding tables; L layers, T context, d width; PaLM's appendix B, as nanoGPT) and is given as a fraction of
this machine's peak, measured here as the best of a few large matrix multiplications (float32; bfloat16 rows also
against a bfloat16 peak). The peak is measured again after every timed step and each row is compared with the
median of its own measurements, so that on a machine shared with other work both sides see the same share of it.
On a GPU the peak measured this way is below the datasheet's, so MFU reads higher than against the datasheet.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from common import describe, sync, write_json

from llm_from_scratch.core import get_device
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.pretrain import calc_loss_batch
from llm_from_scratch.trainer import MODEL_CONFIGS, Trainer, TrainConfig, make_optimizer, use_fused_kernels

CONFIGS = {  # name -> (model config, batch size)
    '124m': ({**GPT_CONFIG_124M, 'context_length': 256}, 8),                 # the book's chapter-5 setting, batch 8
    'small': (dict(MODEL_CONFIGS['gpt-verdict']), 8),                         # the CLI's default model
}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    "FLOP/s of the best of `repeats` n x n matrix multiplications."
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float('inf')
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(cfg: dict) -> float:
    "6N + 12 L T d for a GPTModel config: N counts every parameter but the token and position embeddings."
    d, L, V, T = cfg['emb_dim'], cfg['n_layers'], cfg['vocab_size'], cfg['context_length']
    per_block = 4 * d * d + 4 * d + 8 * d * d + 5 * d + 4 * d  # Q, K, V, out (+ biases); FF (+ biases); 2 LayerNorms
    if cfg.get('qkv_bias'):
        per_block += 3 * d
    n = L * per_block + 2 * d + d * V                          # final LayerNorm, output head
    return 6 * n + 12 * L * T * d


def hf_model(cfg: dict):
    "transformers' GPT2LMHeadModel with the same sizes and dropout, its SDPA attention."
    from transformers import GPT2Config, GPT2LMHeadModel
    c = GPT2Config(vocab_size=cfg['vocab_size'], n_positions=cfg['context_length'], n_embd=cfg['emb_dim'], n_layer=cfg['n_layers'],
                   n_head=cfg['n_heads'], resid_pdrop=cfg['drop_rate'], embd_pdrop=cfg['drop_rate'], attn_pdrop=cfg['drop_rate'],
                   attn_implementation='sdpa')
    m = GPT2LMHeadModel(c)
    assert m.config._attn_implementation == 'sdpa'
    return m


def implementations(cfg, batch, device, amp, compile_):
    "(label, builder) pairs; a builder makes the model and returns its step function, which takes (x, y)."
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (lambda: torch.autocast(device.type, enabled=False))

    def ours(compiled):
        def build():
            torch.manual_seed(123)
            model = use_fused_kernels(GPTModel({**cfg, 'attn_impl': 'sdpa'}))
            tc = TrainConfig(max_steps=10**6, batch_size=batch, device=str(device), compile=compiled, schedule='constant',
                             grad_clip=None, precision='bf16' if amp else 'fp32', progress=False)
            trainer = Trainer(model, [], None, tc)
            return lambda x, y: trainer.train_step([(x, y)])
        return build

    def book():
        torch.manual_seed(123)
        model = GPTModel(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)

        def step(x, y):
            optimizer.zero_grad()
            with autocast():
                loss = calc_loss_batch(x, y, model, device)
            loss.backward()
            optimizer.step()
        return step

    def transformers():
        torch.manual_seed(123)
        model = hf_model(cfg).to(device)
        model.train()
        optimizer = make_optimizer(model, lr=4e-4)

        def step(x, y):
            with autocast():
                logits = model(x.to(device)).logits                                  # (b, T, vocab_size)
                loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    out = [('ours', ours(False))] + ([('ours + torch.compile', ours(True))] if compile_ else [])
    return out + [('book', book), ('transformers', transformers)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    ap.add_argument('--device', default=None, help='cpu, cuda, mps; default: the best available')
    ap.add_argument('--steps', type=int, default=2, help='timed steps per implementation and round (the median is reported)')
    ap.add_argument('--rounds', type=int, default=2, help='rounds over the implementations, in alternating order')
    ap.add_argument('--warmup', type=int, default=1, help='untimed steps after building a model (compilation happens here)')
    ap.add_argument('--compile', action='store_true', help='also time ours under torch.compile')
    ap.add_argument('--bf16-impls', nargs='*', default=None, help='time only these implementations in bf16 (default: all)')
    ap.add_argument('--peak-n', type=int, default=None, help='matrix size for the peak measurements (default 2048 on CPU, 8192 on GPU)')
    ap.add_argument('--threads', type=int, default=None, help="CPU threads (default: PyTorch's choice); 1 is steadier on a busy machine")
    ap.add_argument('--json', default=None, metavar='PATH', help='also write the table and the machine to PATH')
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = get_device(args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32
    n = args.peak_n or (8192 if device.type == 'cuda' else 2048)
    dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16}
    print(f'# training benchmark: torch {torch.__version__}, {describe(device)}')
    print(f'# {args.rounds} rounds of: build, {args.warmup} warm-up step, {args.steps} timed steps, for each implementation; '
          f'after every timed step, the {n} x {n} matmul peak in fp32 and bf16 (best of 3)')
    rows, all_peaks = [], {k: [] for k in dtypes}
    for name in args.configs:
        cfg, batch = CONFIGS[name]
        T = cfg['context_length']
        g = torch.Generator().manual_seed(0)
        ids = lambda: torch.randint(0, cfg['vocab_size'], (batch, T), generator=g)  # (batch, T)
        batches = [(ids(), ids()) for _ in range(args.warmup + args.steps)]
        for prec in args.precisions:
            amp = torch.bfloat16 if prec == 'bf16' else None
            impls = [(label, build) for label, build in implementations(cfg, batch, device, amp, args.compile)
                     if prec == 'fp32' or not args.bf16_impls or label in args.bf16_impls]
            times = {label: [] for label, _ in impls}
            peaks = {label: {k: [] for k in dtypes} for label, _ in impls}
            for r in range(args.rounds):
                for label, build in (impls if r % 2 == 0 else impls[::-1]):
                    with warnings.catch_warnings():
                        warnings.simplefilter('ignore')
                        try:
                            step = build()
                        except ImportError as e:
                            print(f'# {label}: {e}')
                            continue
                        for i, (x, y) in enumerate(batches):
                            x, y = x.to(device), y.to(device)
                            sync(device)
                            t = time.perf_counter()
                            step(x, y)
                            sync(device)
                            dt = time.perf_counter() - t
                            if i >= args.warmup:
                                times[label].append(dt)
                                for k, dtype in dtypes.items():
                                    peaks[label][k].append(matmul_peak(device, dtype, n, repeats=3))
                            print(f'#   {name} {prec} {label}: round {r} step {i} {dt:.2f} s', flush=True)
                    del step
                    gc.collect()
            for label, ts in times.items():
                if ts:
                    peak = {k: statistics.median(v) for k, v in peaks[label].items()}
                    rows.append((name, prec, label, batch * T / statistics.median(ts), peak))
                    for k in dtypes:
                        all_peaks[k] += peaks[label][k]
    print()
    print('| config | precision | implementation | tokens/s | vs book | vs transformers | vs ours fp32 | achieved GFLOP/s | '
          'of fp32 peak | of bf16 peak |')
    print('|---|---|---|---:|---:|---:|---:|---:|---:|---:|')
    tps = {(c, p, label): v for c, p, label, v, _ in rows}
    table = []
    for c, p, label, v, peak in rows:
        ref = lambda lab, prec=p: tps.get((c, prec, lab))
        flops = flops_per_token(CONFIGS[c][0]) * v
        vs = [f'{v / ref(lab):.2f}x' if ref(lab) else 'n/a' for lab in ('book', 'transformers')]
        ours_fp32 = f'{v / ref("ours", "fp32"):.2f}x' if ref('ours', 'fp32') else 'n/a'
        print(f'| {c} | {p} | {label} | {v:,.0f} | {vs[0]} | {vs[1]} | {ours_fp32} | {flops / 1e9:,.1f} | '
              f'{flops / peak["fp32"]:.0%} | {flops / peak["bf16"]:.0%} |')
        table.append({'config': c, 'precision': p, 'implementation': label, 'tokens_per_s': v,
                      'vs_book': v / ref('book') if ref('book') else None,
                      'vs_transformers': v / ref('transformers') if ref('transformers') else None,
                      'vs_ours_fp32': v / ref('ours', 'fp32') if ref('ours', 'fp32') else None,
                      'gflops': flops / 1e9, 'of_fp32_peak': flops / peak['fp32'],
                      'of_bf16_peak': flops / peak['bf16']})
    print('\nmatmul peak measured during the runs (median): ' +
          ', '.join(f'{k} {statistics.median(v) / 1e9:,.0f} GFLOP/s' for k, v in all_peaks.items() if v))
    if args.json:
        write_json(args.json, {'train': table}, device, configs={c: {'batch': CONFIGS[c][1],
                   'context_length': CONFIGS[c][0]['context_length'], 'emb_dim': CONFIGS[c][0]['emb_dim'],
                   'n_layers': CONFIGS[c][0]['n_layers']} for c in args.configs}, steps=args.steps,
                   rounds=args.rounds, peak_gflops={k: statistics.median(v) / 1e9 for k, v in all_peaks.items() if v})
    print('FLOPs per token (6N + 12 L T d): ' + ', '.join(f'{c} {flops_per_token(CONFIGS[c][0]) / 1e9:.3f} G' for c in args.configs))


if __name__ == '__main__':
    main()
