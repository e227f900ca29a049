"BPETokenizerSimple: exact equality with tiktoken's GPT-2 encoding, round trips, special tokens, training against a naive reference."
import json
import re
from collections import Counter

import pytest
import regex
import tiktoken
from conftest import shared_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_from_scratch.bpe import BPETokenizerSimple, apply_merges, bytes_to_unicode, learn_merges, pretokenize
from llm_from_scratch.core import download

# The autouse fixture that gives each test its own LLM_FROM_SCRATCH_HOME is function-scoped; the
# examples of one test share it, which is harmless here.
many = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
some = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope='module')
def tik():
    return tiktoken.get_encoding('gpt2')


@pytest.fixture(scope='module')
def gpt2():
    tok = BPETokenizerSimple()
    tok.load_vocab_and_merges_from_openai(download('gpt2-encoder'), download('gpt2-vocab'))
    return tok


@pytest.fixture(scope='module')
def verdict():
    return download('the-verdict').read_text(encoding='utf-8')


@pytest.fixture(scope='module')
def trained(verdict):
    tok = BPETokenizerSimple()
    tok.train(verdict, vocab_size=1000, allowed_special={'<|endoftext|>'})
    return tok


# ---- text strategies: whitespace runs, digits, emoji, scripts, contractions, newlines ----
FRAGMENTS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "don't", "I'M", "it's", "''", "'",
             ' ', '  ', '   ', '\n', '\n\n', '\r\n', '\t', ' \n ', '\u00a0', '\u3000', '\u2028', '\x0b\x0c', '\x85',
             '0', '7', '42', '3.14', '1,000', '٣٤', '१२', '½', '²', 'Hello', ' world', 'the', ' The', 'a', 'A',
             '!!', '...', '?!', '--', '—', '…', '"', '@', '#', '$', '<|', '|>', 'e\u0301', 'ﬁ', 'ǅ',
             '😀', '👍🏽', '👩\u200d👩\u200d👧', '🚀', '🇫🇷', '❤️', '中文', '日本語', 'カタカナ', '한국어', 'Привет', 'мир',
             'مرحبا', 'עברית', 'हिन्दी', 'ไทย', 'Ελληνικά', 'ñ', 'ß', 'İ', '\x00', '\x7f', '\ufeff', '\U0010fffd']
whitespace = st.text(alphabet=' \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u200b\u2028\u202f\u3000', min_size=1, max_size=8)
digits = st.text(alphabet='0123456789٠١٢٣४५६७८९⁰½', min_size=1, max_size=6)
letters = st.text(alphabet=st.characters(categories=['L', 'M']), min_size=1, max_size=8)
scripts = st.text(alphabet=st.one_of(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),   # CJK
                                     st.characters(min_codepoint=0x0600, max_codepoint=0x06FF),   # Arabic
                                     st.characters(min_codepoint=0x0400, max_codepoint=0x04FF),   # Cyrillic
                                     st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
                                     st.characters(min_codepoint=0x20, max_codepoint=0x7E)),      # ASCII
                  min_size=1, max_size=8)
# Code points that this Python's Unicode tables leave unassigned are left out: the `regex` module and tiktoken's Rust
# engine classify them by different Unicode versions (U+3D000 is a letter to one, not to the other), so their
# pre-tokens differ for a reason that lies outside the tokenizer.
assigned = st.characters(exclude_categories=['Cn', 'Cs'])  # (lone surrogates are not text either)
mixed = st.lists(st.one_of(st.sampled_from(FRAGMENTS), whitespace, digits, letters, scripts,
                           st.text(alphabet=assigned, max_size=4)), max_size=10).map(''.join)


# ---- GPT-2: equality with tiktoken ----
def test_gpt2_vocabulary(gpt2, tik):
    assert len(gpt2.vocab) == tik.n_vocab == 50257
    assert gpt2.special_tokens == {'<|endoftext|>': tik.eot_token}
    assert len(gpt2.bpe_merges) == 50000


def test_gpt2_equals_tiktoken_on_every_data_file(gpt2, tik):
    checked = []
    for path in sorted(shared_data().rglob('*')):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding='utf-8')
        except UnicodeDecodeError:
            continue  # not a text file (the zip)
        ids = gpt2.encode(text, disallowed_special=())
        assert ids == tik.encode(text, disallowed_special=()), path.name
        assert gpt2.decode(ids) == text, path.name
        checked.append(path.name)
    assert {'the-verdict.txt', 'tinyshakespeare.txt', 'encoder.json', 'vocab.bpe'} <= set(checked)


@many
@given(mixed)
def test_gpt2_equals_tiktoken_on_mixed_text(gpt2, tik, s):
    ids = gpt2.encode(s)
    assert ids == tik.encode(s)
    assert gpt2.decode(ids) == s


@many
@given(st.text(alphabet=assigned))
def test_gpt2_equals_tiktoken_on_any_text(gpt2, tik, s):
    ids = gpt2.encode(s, disallowed_special=())
    assert ids == tik.encode(s, disallowed_special=())
    assert gpt2.decode(ids) == s


@some
@given(st.text(alphabet=st.characters(categories=['Cs', 'Ll', 'Zs', 'Nd', 'So'])))
def test_lone_surrogates_as_tiktoken(gpt2, tik, s):
    assert gpt2.encode(s) == tik.encode(s)  # surrogates that do not pair up become U+FFFD


def test_gpt2_book_examples(gpt2, tik):
    for s in ['This is some text', 'Hello,', 'Implementations', 'asdf asdfasdf a!!, @aba 9asdf90asdf',
              'Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.']:
        assert gpt2.encode(s, allowed_special={'<|endoftext|>'}) == tik.encode(s, allowed_special={'<|endoftext|>'})


def test_small_cache_same_ids(gpt2, tik, verdict):
    "The bound on the pre-token cache changes nothing but speed."
    tok = BPETokenizerSimple()
    tok.load_vocab_and_merges_from_openai(download('gpt2-encoder'), download('gpt2-vocab'))
    tok._cache.max_size = 7
    assert tok.encode(verdict) == tik.encode(verdict)
    assert len(tok._cache) <= 7


# ---- special tokens: tiktoken's rules ----
def outcome(f, *args, **kw):
    try:
        return f(*args, **kw)
    except ValueError:
        return ValueError


ALLOWED = [set(), {'<|endoftext|>'}, 'all', {'<|endoftext|>', '<|fim|>'}, {'hello'}]
DISALLOWED = ['all', (), {'<|endoftext|>'}, {'hello'}, {'Hello'}]


SPECIAL_PARTS = ['<|endoftext|>', '<|endoftext', 'endoftext|>', '<|', ' hello', 'Hello', '\n', ' x ', '<|endoftext|><|endoftext|>']


@some
@given(st.lists(st.sampled_from(SPECIAL_PARTS), max_size=6).map(''.join),
       st.sampled_from(ALLOWED), st.sampled_from(DISALLOWED))
def test_special_tokens_as_tiktoken(gpt2, tik, s, allowed, disallowed):
    assert outcome(gpt2.encode, s, allowed_special=allowed, disallowed_special=disallowed) == \
        outcome(tik.encode, s, allowed_special=allowed, disallowed_special=disallowed)


def test_special_tokens_explicit(gpt2, trained):
    s = 'a<|endoftext|>b'
    with pytest.raises(ValueError, match='not allowed'):
        gpt2.encode(s)
    assert gpt2.encode(s, allowed_special={'<|endoftext|>'}) == [64, 50256, 65]
    assert gpt2.encode(s, allowed_special='all') == [64, 50256, 65]
    assert 50256 not in gpt2.encode(s, disallowed_special=())
    assert gpt2.decode(gpt2.encode(s, disallowed_special=())) == s
    ids = trained.encode(s, allowed_special={'<|endoftext|>'})
    assert ids.count(trained.special_tokens['<|endoftext|>']) == 1
    assert trained.decode(ids) == s
    with pytest.raises(ValueError, match='not allowed'):
        trained.encode(s)


# ---- round trips ----
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(mixed, st.text()))
def test_trained_round_trip(trained, s):
    assert trained.decode(trained.encode(s, disallowed_special=())) == s


def test_decode_replaces_partial_characters(gpt2, tik):
    ids = gpt2.encode('😀')
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == tik.decode(ids[:1])


def test_decode_takes_tensors_and_arrays(trained):
    np = pytest.importorskip('numpy')
    torch = pytest.importorskip('torch')
    ids = trained.encode('Jack embraced beauty through art and life.')
    text = trained.decode(ids)
    assert trained.decode(torch.tensor(ids)) == trained.decode(np.array(ids)) == trained.decode(iter(ids)) == text


# ---- training: against a naive reference ----
PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def naive_merges(text: str, vocab_size: int, specials=()) -> dict:
    "Reference trainer: bytes are ids 0-255, then sorted specials, then merges; every pair of every occurrence re-counted per merge."
    chunks = re.split('|'.join(map(re.escape, specials)), text) if specials else [text]
    words = [list(w.encode('utf-8')) for c in chunks for w in PAT.findall(c)]
    merges = {}
    for new_id in range(256 + len(specials), vocab_size):
        counts = Counter()
        for w in words:
            for i in range(len(w) - 1):
                counts[w[i], w[i + 1]] += 1
        if not counts:
            break
        top = max(counts.values())
        best = min(p for p, c in counts.items() if c == top)  # tie: smallest (left, right)
        merges[best] = new_id
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(['a', 'b', 'ab', ' ', '  ', '\n', 'é', '1', '2', "'s", '!', '<|endoftext|>', 'ba', 'aaa']),
                max_size=40).map(''.join),
       st.integers(257, 300))
def test_train_equals_naive_reference(s, vocab_size):
    tok = BPETokenizerSimple()
    tok.train(s, vocab_size, allowed_special={'<|endoftext|>'})
    assert tok.bpe_merges == naive_merges(s, vocab_size, ['<|endoftext|>'])
    assert len(tok.vocab) <= vocab_size
    assert tok.decode(tok.encode(s, allowed_special='all')) == s


def test_train_verdict_1000(trained, verdict):
    "The book's test case: 256 bytes + <|endoftext|> + 743 merges = 1,000 tokens."
    assert len(trained.vocab) == 1000
    assert len(trained.bpe_merges) == 743
    assert trained.special_tokens == {'<|endoftext|>': 256}
    assert trained.bpe_merges == naive_merges(verdict, 1000, ['<|endoftext|>'])
    assert sorted(trained.vocab) == list(range(1000))
    byte_chars = bytes_to_unicode()
    assert all(trained.vocab[b] == byte_chars[b] for b in range(256))
    for (a, b), n in trained.bpe_merges.items():
        assert trained.vocab[n] == trained.vocab[a] + trained.vocab[b]
    s = 'Jack embraced beauty through art and life.'
    assert trained.decode(trained.encode(s)) == s
    assert trained.decode(trained.encode(verdict)) == verdict


def test_encoding_replays_training(trained, verdict):
    "Each pre-token of the training text is encoded to the tokens it had at the end of training."
    words = {w: list(w.encode('utf-8')) for w in set(pretokenize(verdict))}
    for pair, n in trained.bpe_merges.items():  # replay every merge on every word, in order
        for w, ids in words.items():
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    out.append(n)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[w] = out
    for w, ids in words.items():
        assert trained.encode(w) == ids, w


def test_learn_merges_stops_when_pairs_run_out():
    assert learn_merges(Counter({'ab': 3, 'c': 5}), 10) == {(97, 98): 256}
    tok = BPETokenizerSimple()
    tok.train('ab ab', vocab_size=1000, allowed_special=set())
    assert len(tok.vocab) == 256 + 2  # 'ab', then ' ab'
    tok.train('', vocab_size=300)
    assert len(tok.vocab) == 257 and tok.bpe_merges == {}


def test_train_does_not_merge_special_tokens():
    tok = BPETokenizerSimple()
    tok.train('<|endoftext|>' * 50 + 'hi', vocab_size=300, allowed_special={'<|endoftext|>'})
    assert all('endoftext' not in t for i, t in tok.vocab.items() if i != 256)


# ---- saving and loading ----
def test_save_load_round_trip(tmp_path, trained, gpt2, verdict):
    for tok in (trained, gpt2):
        v, m = tmp_path/'vocab.json', tmp_path/'merges.json'
        tok.save_vocab_and_merges(v, m)
        back = BPETokenizerSimple()
        back.load_vocab_and_merges(v, m)
        assert back.vocab == tok.vocab and back.bpe_merges == tok.bpe_merges and back.special_tokens == tok.special_tokens
        assert back.encode(verdict) == tok.encode(verdict)
    assert json.loads((tmp_path/'vocab.json').read_text(encoding='utf-8'))['50256'] == '<|endoftext|>'


# ---- bad input ----
def test_bad_inputs(tmp_path, trained):
    tok = BPETokenizerSimple()
    with pytest.raises(ValueError, match='too small'):
        tok.train('hello', vocab_size=256)
    with pytest.raises(ValueError, match='empty'):
        tok.train('hello', vocab_size=300, allowed_special={''})
    with pytest.raises(ValueError, match='not found'):
        trained.decode([5, 1000])
    (tmp_path/'v.json').write_text(json.dumps({'0': 'a'}))
    (tmp_path/'m.json').write_text('[]')
    with pytest.raises(ValueError, match='no token for byte'):
        tok.load_vocab_and_merges(tmp_path/'v.json', tmp_path/'m.json')
    vocab = {str(i): c for i, c in bytes_to_unicode().items()} | {'256': 'xy'}
    (tmp_path/'v.json').write_text(json.dumps(vocab))
    (tmp_path/'m.json').write_text(json.dumps([{'pair': [ord('a'), ord('b')], 'new_id': 256}]))
    with pytest.raises(ValueError, match='does not spell'):
        tok.load_vocab_and_merges(tmp_path/'v.json', tmp_path/'m.json')
    (tmp_path/'m.json').write_text(json.dumps([{'pair': [1]}]))
    with pytest.raises(ValueError, match='expected a list'):
        tok.load_vocab_and_merges(tmp_path/'v.json', tmp_path/'m.json')
    (tmp_path/'e.json').write_text(json.dumps({c: i for i, c in bytes_to_unicode().items()}))
    (tmp_path/'vocab.bpe').write_text('#version: 0.2\na b\n', encoding='utf-8')
    with pytest.raises(ValueError, match='merge 1'):
        tok.load_vocab_and_merges_from_openai(tmp_path/'e.json', tmp_path/'vocab.bpe')


def test_whole_token_shortcut_changes_nothing(gpt2, trained):
    "Merging the bytes of any token gives that token, so encoding a pre-token that is a token as itself is only a speed-up."
    for tok in (gpt2, trained):
        for i in tok.bpe_merges.values():
            data = tok.vocab[i]
            byte_ids = [tok.inverse_vocab[c] for c in data]
            assert apply_merges(byte_ids, tok._ranks) == [i], data


# ---- long unbroken pre-tokens: exact, and n log n rather than n^2 (hardening) ----
class CountingRanks(dict):
    "A rank table that counts its lookups: a measure of work that does not depend on the machine."
    def __init__(self, *a):
        super().__init__(*a)
        self.lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


@pytest.mark.parametrize('text', ['a' * 100_000, 'ab' * 30_000, '=' * 50_000, '7' * 40_000, 'é' * 30_000,
                                  'x' + 'ab' * 20_000 + ' tail', 'Supercalifragilistic' * 3_000])
def test_long_pretokens_equal_tiktoken(gpt2, tik, text):
    "One pre-token of tens of thousands of bytes encodes exactly as tiktoken does (it used to take minutes)."
    gpt2._cache.clear()
    assert gpt2.encode(text) == tik.encode(text)


def test_long_pretoken_work_grows_n_log_n(gpt2):
    "Rank lookups for a run of n letters stay within a small multiple of n (the scan needed about n^2 / 2)."
    saved = gpt2._ranks
    try:
        for n in (1_000, 4_000, 16_000):
            gpt2._ranks, gpt2._cache = CountingRanks(saved), type(gpt2._cache)(gpt2._encode_piece)
            gpt2.encode('a' * n)
            assert gpt2._ranks.lookups < 8 * n, (n, gpt2._ranks.lookups)
    finally:
        gpt2._ranks, gpt2._cache = saved, type(gpt2._cache)(gpt2._encode_piece)


@some
@given(st.lists(st.sampled_from(['a', 'b', 'ab', 'ba', 'aa', 'the', 'é', '中']), min_size=20, max_size=400))
def test_heap_and_scan_merge_alike(gpt2, parts):
    "Merging by heap and by scan give the same tokens on random long pre-tokens."
    from llm_from_scratch.bpe import merge_by_heap, merge_by_scan
    ids = [gpt2._byte_ids[b] for b in ''.join(parts).encode('utf-8')]
    assert merge_by_heap(ids, gpt2._ranks) == merge_by_scan(ids, gpt2._ranks)
