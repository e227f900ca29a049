"""Time chapter 3's MultiHeadAttention against the efficient variants of its bonus page (nbs/03b_attention_variants.ipynb).

    python bench/attention.py                         # batch 8 x 1,024 tokens x 768, 12 heads, float32, best device
    python bench/attention.py --batch 2 --seq 256     # a smaller setting
    python bench/attention.py --device cuda --dtype bfloat16

Every variant gets the chapter module's weights and the same input. Forward is timed in eval() under
torch.no_grad() (as in generation), forward+backward in train() with dropout 0 (as in training). The table
gives milliseconds per call (the best of --repeats calls, the variants taking turns so that a busy machine
slows them all alike) and the speed-up over the chapter's
MultiHeadAttention measured in the same run, plus the largest output difference from it as a sanity check,
and on CUDA the peak memory of a forward+backward call.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from llm_from_scratch.attention import MultiHeadAttention
from llm_from_scratch.attention_variants import (
    MultiHeadAttentionCombinedQKV,
    MultiHeadAttentionEinsum,
    MultiHeadAttentionFlex,
    MultiHeadAttentionPyTorch,
    MultiHeadAttentionSDPA,
    MultiHeadAttentionStacked,
    flex_attention,
)
from common import describe, sync, write_json

from llm_from_scratch.core import get_device

REFERENCE = 'ch. 3 MultiHeadAttention'


def variants(d: int, heads: int, context: int):
    "(label, constructor) for every implementation; each constructor takes no arguments."
    args = (d, d, context, 0.0, heads)
    out = [
        (REFERENCE, lambda: MultiHeadAttention(*args)),
        ("ch. 3 MultiHeadAttention, attn_impl='sdpa'", lambda: MultiHeadAttention(*args, attn_impl='sdpa')),
        ('stacked heads (ch. 3 wrapper + out_proj)', lambda: MultiHeadAttentionStacked(*args)),
        ('combined QKV', lambda: MultiHeadAttentionCombinedQKV(*args)),
        ('einsum', lambda: MultiHeadAttentionEinsum(*args)),
        ('SDPA, PyTorch picks the kernel', lambda: MultiHeadAttentionSDPA(*args)),
        ('SDPA, flash=True', lambda: MultiHeadAttentionSDPA(*args, flash=True)),
        ('SDPA, flash=False', lambda: MultiHeadAttentionSDPA(*args, flash=False)),
        ('nn.MultiheadAttention', lambda: MultiHeadAttentionPyTorch(*args)),
    ]
    if flex_attention is not None:
        out.append(('FlexAttention, compiled', lambda: MultiHeadAttentionFlex(*args, compiled=True)))
    return out


def timed(fn, device: torch.device) -> float:
    "Seconds one call of `fn` takes, queued GPU work included."
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def round_robin(calls: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    "Best time per label, calling each in turn `repeats` times, so a busy machine slows all alike."
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    best = {label: float('inf') for label in calls}
    for _ in range(repeats):
        for label, fn in calls.items():
            best[label] = min(best[label], timed(fn, device))
    return best


def ms(seconds: float) -> str:
    "Milliseconds, with a decimal only where it matters."
    return f'{seconds * 1e3:,.0f}' if seconds >= 0.1 else f'{seconds * 1e3:.2f}'


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--seq', type=int, default=1024, help='tokens per sequence (also the context length)')
    ap.add_argument('--emb', type=int, default=768, help='d_in = d_out')
    ap.add_argument('--heads', type=int, default=12)
    ap.add_argument('--device', default=None, help='cpu, cuda, mps; default: cuda, then mps, then cpu')
    ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    ap.add_argument('--warmup', type=int, default=1, help='untimed calls per variant before timing')
    ap.add_argument('--repeats', type=int, default=5, help='timed calls per variant, in turn; the best is reported')
    ap.add_argument('--only', nargs='*', default=None, help='run only variants whose label contains one of these words')
    ap.add_argument('--no-backward', action='store_true', help='time the forward pass only')
    ap.add_argument('--json', default=None, metavar='PATH', help='also write the table and the machine to PATH')
    args = ap.parse_args(argv)

    device = get_device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f'# attention benchmark: torch {torch.__version__}, {describe(device)}')
    print(f'# batch {args.batch} x {args.seq} tokens x {args.emb}, {args.heads} heads, {args.dtype} '
          f'(float32 matmul precision {torch.get_float32_matmul_precision()!r}); '
          f'best of {args.repeats} calls per variant, taken in turns, after {args.warmup} warm-up')

    torch.manual_seed(123)
    base = MultiHeadAttention(args.emb, args.emb, args.seq, 0.0, args.heads)  # the weights every variant gets, kept on the CPU
    x = torch.randn(args.batch, args.seq, args.emb, device=device, dtype=dtype)
    upstream = torch.randn_like(x)
    with torch.no_grad():
        want = copy.deepcopy(base).to(device, dtype).eval()(x)

    built, notes = {}, []
    for label, build in variants(args.emb, args.heads, args.seq):
        if args.only and label != REFERENCE and not any(w.lower() in label.lower() for w in args.only):
            continue
        try:
            m = build()
            if hasattr(m, 'load_weights_from'):
                m.load_weights_from(base)
            else:
                m.load_state_dict(base.state_dict())
            m = m.to(device, dtype).eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter('ignore')
                first = timed(lambda: m(x), device)  # FlexAttention compiles its kernel here
                diff = (m(x).float() - want.float()).abs().max().item()
            if 'Flex' in label:
                notes.append(f'{label}: the first forward call (generating the kernel) took {first:.1f} s')
            built[label] = (m, diff)
        except Exception as e:  # one variant failing (out of memory, an unsupported dtype) must not hide the others
            notes.append(f'{label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}')
    print(f'# built {len(built)} variants; timing the forward pass', flush=True)

    def forward(m):

        def call():
            with torch.no_grad():
                return m(x)
        return call

    def forward_backward(m):
        xg = x.clone().requires_grad_()

        def call():
            m.zero_grad(set_to_none=True)
            xg.grad = None
            m(xg).backward(upstream)
        return call

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        t_fwd = round_robin({label: forward(m) for label, (m, _) in built.items()}, device, args.warmup, args.repeats)
        fell_back = {label for label, (m, _) in built.items() if getattr(m, 'fell_back', False)}
        t_bwd, peak = {}, {}
        if not args.no_backward:
            print('# timing forward+backward', flush=True)
            trainable = {}
            for label, (m, _) in built.items():
                if 'Flex' in label and device.type == 'cpu':
                    notes.append(f'{label}: no forward+backward on the CPU (no CPU backward in torch {torch.__version__})')
                    continue
                m.train()
                trainable[label] = forward_backward(m)
                if device.type == 'cuda':  # peak memory of one call, alone on the device
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                    trainable[label]()
                    sync(device)
                    peak[label] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            t_bwd = round_robin(trainable, device, args.warmup, args.repeats)
            fell_back |= {label for label, (m, _) in built.items() if getattr(m, 'fell_back', False)}

    if REFERENCE not in built:
        raise SystemExit("the reference (the chapter's MultiHeadAttention) failed: " + '; '.join(notes))
    cuda = device.type == 'cuda'
    print()
    print('| variant | forward ms | speed-up | forward+backward ms | speed-up | max abs diff |' + (' peak MiB (fwd+bwd) |' if cuda else ''))
    print('|---|---:|---:|---:|---:|---:|' + ('---:|' if cuda else ''))
    rows = []
    for label, (_, diff) in built.items():
        fb = 'n/a | n/a'
        if label in t_bwd and REFERENCE in t_bwd:
            fb = f'{ms(t_bwd[label])} | {t_bwd[REFERENCE] / t_bwd[label]:.2f}x'
        mem = (f' {peak[label]:,.0f} |' if label in peak else ' n/a |') if cuda else ''
        shown = label + (' (fell back: PyTorch picked the kernel)' if label in fell_back else '')
        print(f'| {shown} | {ms(t_fwd[label])} | {t_fwd[REFERENCE] / t_fwd[label]:.2f}x | {fb} | {diff:.1e} |{mem}')
        rows.append({'variant': shown, 'forward_ms': t_fwd[label] * 1e3,
                     'forward_speedup': t_fwd[REFERENCE] / t_fwd[label],
                     'forward_backward_ms': t_bwd[label] * 1e3 if label in t_bwd else None,
                     'forward_backward_speedup': t_bwd[REFERENCE] / t_bwd[label]
                     if label in t_bwd and REFERENCE in t_bwd else None,
                     'max_abs_diff': diff, 'peak_mib': peak.get(label)})
    for n in notes:
        print(f'\n- {n}', end='')
    print()
    if args.json:
        write_json(args.json, {'attention': rows}, device, batch=args.batch, seq=args.seq, emb=args.emb,
                   heads=args.heads, dtype=args.dtype, repeats=args.repeats, reference=REFERENCE, notes=notes)


if __name__ == '__main__':
    main()
