"""Byte-pair encoding: our pure-Python BPETokenizerSimple against tiktoken, OpenAI's original encoder,
the re-count-every-merge trainer and Hugging Face `tokenizers`, all measured in this run.

    python bench/bpe.py [--repeats 3] [--recount-budget 60]

Encoding: throughput (MB/s of UTF-8) on Tiny Shakespeare with GPT-2's merges, one thread. "cold" starts
from an empty pre-token cache (a fresh tokenizer), "warm" encodes the same text again.
Long pre-tokens: seconds to encode one unbroken run of n letters (ours merges it through a heap; the scan alone,
quadratic, is timed where it finishes in seconds).
Training: seconds to learn a 1,000- and a 5,000-token vocabulary (with <|endoftext|>) on Tiny Shakespeare.
The re-count trainer runs for at most --recount-budget seconds per vocabulary; the merges left are then
counted at the cost of one merge on the *final* token sequence, which is a lower bound (the sequence
only shrinks), so its time is a lower bound and our speed-up over it too.
"""
import argparse
import os
import platform
import sys
import time
from collections import Counter

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')  # Hugging Face tokenizers on one thread, like the others
os.environ.setdefault('RAYON_NUM_THREADS', '1')

import regex  # noqa: E402
import tiktoken  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from llm_from_scratch.bpe import BPETokenizerSimple, bytes_to_unicode, merge_pair, pretokenize  # noqa: E402
from llm_from_scratch.core import download  # noqa: E402

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class OriginalEncoder:
    "The algorithm of OpenAI's GPT-2 `encoder.py` (as the book presents it): strings, a set of pairs, `min` by rank."
    def __init__(self, encoder: dict, merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.byte_encoder = bytes_to_unicode()
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.cache = {}
        self.pat = regex.compile(GPT2_PATTERN)

    @staticmethod
    def get_pairs(word):
        return {(a, b) for a, b in zip(word, word[1:])}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = self.get_pairs(word)
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float('inf')))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = self.get_pairs(word)
        out = ' '.join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pat.findall(text):
            token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(' '))
        return ids


def gpt2_files():
    import json
    encoder = json.loads(download('gpt2-encoder').read_text(encoding='utf-8'))
    lines = download('gpt2-vocab').read_text(encoding='utf-8').splitlines()[1:]
    return encoder, [tuple(line.split()) for line in lines if line]


def best_of(repeats: int, setup, run):
    "Smallest time of `run(setup())` over `repeats` runs (setup not timed), and its last result."
    best, out = float('inf'), None
    for _ in range(repeats):
        state = setup()
        t0 = time.perf_counter()
        out = run(state)
        best = min(best, time.perf_counter() - t0)
    return best, out


def recount_step(ids: list[int], new_id: int):
    "One merge of the re-count trainer: count all pairs of the whole sequence, merge the most frequent."
    counts = Counter(zip(ids, ids[1:]))
    pairs = [(c, p) for p, c in counts.items() if p[0] >= 0 and p[1] >= 0]  # -1 separates pre-tokens
    if not pairs:
        return None, ids
    top = max(c for c, _ in pairs)
    best = min(p for c, p in pairs if c == top)  # ties: the smallest pair, as ours
    return best, merge_pair(ids, best, new_id)


def train_recount(text: str, n_merges: int, first_id: int, budget: float, final_ids: list[int]):
    "The book's trainer (one flat sequence, re-counted for every merge), with GPT-2 pre-token boundaries."
    ids = []
    for piece in pretokenize(text.replace('<|endoftext|>', '')):
        ids.extend(piece.encode('utf-8'))
        ids.append(-1)
    merges = {}
    t0 = time.perf_counter()
    for new_id in range(first_id, first_id + n_merges):
        pair, ids = recount_step(ids, new_id)
        if pair is None:
            break
        merges[pair] = new_id
        if time.perf_counter() - t0 > budget:
            break
    elapsed = time.perf_counter() - t0
    left = n_merges - len(merges)
    if left:
        t1 = time.perf_counter()
        recount_step(final_ids, first_id + n_merges)  # one merge on the shortest sequence the run would see
        elapsed += left * (time.perf_counter() - t1)
    return elapsed, merges, left


def final_sequence(tok: BPETokenizerSimple, text: str) -> list[int]:
    "The whole text after training, as the re-count trainer holds it: pre-token ids separated by -1."
    pieces = pretokenize(text.replace('<|endoftext|>', ''))
    ids = {p: tok.encode(p) for p in set(pieces)}
    out = []
    for piece in pieces:
        out.extend(ids[piece])
        out.append(-1)
    return out


def train_hf(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--recount-budget', type=float, default=60.0, help='seconds of re-count training per vocabulary')
    ap.add_argument('--json', default=None, metavar='PATH', help='also write the tables and the machine to PATH')
    args = ap.parse_args(argv)

    text = download('tinyshakespeare').read_text(encoding='utf-8')
    mb = len(text.encode('utf-8')) / 1e6
    print(f'# bench/bpe.py: Tiny Shakespeare ({mb:.2f} MB), {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, tiktoken {tiktoken.__version__}, one thread\n')

    # ---- encoding ----
    tik = tiktoken.get_encoding('gpt2')
    encoder, merges = gpt2_files()

    def ours():
        tok = BPETokenizerSimple()
        tok.load_vocab_and_merges_from_openai(download('gpt2-encoder'), download('gpt2-vocab'))
        return tok

    t_tik, ref = best_of(args.repeats, lambda: None, lambda _: tik.encode(text))
    t_cold, ids = best_of(args.repeats, ours, lambda tok: tok.encode(text))
    assert ids == ref, 'ours differs from tiktoken'
    warm = ours()
    warm.encode(text)
    t_warm, ids = best_of(args.repeats, lambda: warm, lambda tok: tok.encode(text))
    assert ids == ref
    t_orig, ids = best_of(args.repeats, lambda: OriginalEncoder(encoder, merges), lambda enc: enc.encode(text))
    assert ids == ref, 'the original encoder differs from tiktoken'
    warm_orig = OriginalEncoder(encoder, merges)
    warm_orig.encode(text)
    t_orig_warm, _ = best_of(args.repeats, lambda: warm_orig, lambda enc: enc.encode(text))

    encoding = []
    print('| encoding (GPT-2 merges) | MB/s | vs tiktoken | vs original encoder |')
    print('|---|---:|---:|---:|')
    for name, t in [('tiktoken (Rust, `encode`)', t_tik), ('OpenAI original encoder, cold cache', t_orig),
                    ('OpenAI original encoder, warm cache', t_orig_warm),
                    ('**ours**, cold cache', t_cold), ('ours, warm cache', t_warm)]:
        print(f'| {name} | {mb / t:.2f} | {t_tik / t:.2f}x | {t_orig / t:.2f}x |')
        encoding.append({'encoder': name.replace('**', ''), 'mb_per_s': mb / t, 'vs_tiktoken': t_tik / t,
                         'vs_original': t_orig / t})
    print(f'\ntargets: ours cold >= 0.25x tiktoken: {t_tik / t_cold:.2f}x -> {"met" if t_tik / t_cold >= 0.25 else "NOT met"}; '
          f'ours cold >= 1.3x original (cold): {t_orig / t_cold:.2f}x -> {"met" if t_orig / t_cold >= 1.3 else "NOT met"}\n')

    # ---- long unbroken pre-tokens: one "word" of n letters, where the merge loop used to be quadratic ----
    from llm_from_scratch.bpe import merge_by_scan
    longest = []
    print('| one pre-token of n letters | ours (s) | tiktoken (s) | ours vs tiktoken | scan only (s) | heap vs scan |')
    print('|---|---:|---:|---:|---:|---:|')
    for n in (1_000, 4_000, 16_000, 100_000):
        word = 'a' * n
        t_tik_n, ref = best_of(args.repeats, lambda: None, lambda _, w=word: tik.encode(w))
        t_ours_n, ids = best_of(args.repeats, ours, lambda tok, w=word: tok.encode(w))
        assert ids == ref, f'ours differs from tiktoken on {n} letters'
        # the quadratic scan alone, for the sizes where it finishes in seconds
        t_scan = None
        if n <= 4_000:
            tok = ours()
            byte_ids = [tok._byte_ids[b] for b in word.encode('utf-8')]
            t_scan, scan_ids = best_of(1, lambda: None, lambda _: merge_by_scan(byte_ids, tok._ranks))
            assert scan_ids == ref
        scan_s, ratio = (f'{t_scan:.3f}', f'{t_scan / t_ours_n:.0f}x') if t_scan else ('(minutes)', '–')
        print(f'| {n:,} | {t_ours_n:.4f} | {t_tik_n:.4f} | {t_tik_n / t_ours_n:.2f}x | {scan_s} | {ratio} |')
        longest.append({'letters': n, 'ours_s': t_ours_n, 'tiktoken_s': t_tik_n, 'vs_tiktoken': t_tik_n / t_ours_n,
                        'scan_s': t_scan})
    print()

    # ---- training ----
    rows = []
    for vocab_size in (1000, 5000):
        t_ours, tok = best_of(args.repeats, BPETokenizerSimple, lambda tok: (tok.train(text, vocab_size), tok)[1])
        assert len(tok.vocab) == vocab_size
        t_hf, hf = best_of(args.repeats, lambda: None, lambda _: train_hf(text, vocab_size))
        assert hf.get_vocab_size() == vocab_size
        n_merges = len(tok.bpe_merges)
        t_re, re_merges, left = train_recount(text, n_merges, 257, args.recount_budget, final_sequence(tok, text))
        assert list(re_merges.items()) == list(tok.bpe_merges.items())[:len(re_merges)], 're-count trainer disagrees'
        rows.append((vocab_size, t_ours, t_hf, t_re, left, n_merges))

    print('| training on Tiny Shakespeare | ours (s) | Hugging Face tokenizers (s) | re-count every merge (s) '
          '| our speed vs tokenizers | our speed vs re-count |')
    print('|---|---:|---:|---:|---:|---:|')
    training = []
    for vocab_size, t_ours, t_hf, t_re, left, n in rows:
        re_s = f'≥ {t_re:.0f} ({n - left} of {n} merges run)' if left else f'{t_re:.1f}'
        speed = f'≥ {t_re / t_ours:.0f}x' if left else f'{t_re / t_ours:.0f}x'
        print(f'| vocabulary {vocab_size:,} | {t_ours:.2f} | {t_hf:.2f} | {re_s} | {t_hf / t_ours:.2f}x | {speed} |')
        training.append({'vocab_size': vocab_size, 'ours_s': t_ours, 'tokenizers_s': t_hf, 'recount_s': t_re,
                         'recount_is_lower_bound': bool(left), 'recount_merges_run': n - left, 'merges': n,
                         'speed_vs_tokenizers': t_hf / t_ours, 'speed_vs_recount': t_re / t_ours})
    if args.json:
        from common import write_json
        write_json(args.json, {'encoding': encoding, 'long_pretokens': longest, 'training': training}, corpus_mb=mb, repeats=args.repeats,
                   recount_budget_s=args.recount_budget, tiktoken=tiktoken.__version__, threads=1)
    worst_hf = max(t_ours / t_hf for _, t_ours, t_hf, *_ in rows)
    worst_re = min(t_re / t_ours for _, t_ours, _, t_re, *_ in rows)
    print(f'\ntargets: >= 20x faster than re-count: {worst_re:.0f}x -> {"met" if worst_re >= 20 else "NOT met"}; '
          f'within 5x of tokenizers: {worst_hf:.2f}x its time -> {"met" if worst_hf <= 5 else "NOT met"}')


if __name__ == '__main__':
    main()
