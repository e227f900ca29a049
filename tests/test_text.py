"Chapter 2 (llm_from_scratch.text): tokenizers, the sliding-window dataset and its loader, and bad inputs."
import numpy as np
import pytest
import tiktoken
import torch
from conftest import shared_data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import RandomSampler, SequentialSampler

from llm_from_scratch.core import download
from llm_from_scratch.text import GPTDatasetV1, SimpleTokenizerV1, SimpleTokenizerV2, build_vocab, create_dataloader_v1, split_words

SPECIAL = ['<|endoftext|>', '<|unk|>']


@pytest.fixture(scope='module')
def verdict() -> str:
    shared_data()
    return download('the-verdict').read_text(encoding='utf-8')


@pytest.fixture(scope='module')
def gpt2():
    shared_data()
    return tiktoken.get_encoding('gpt2')


class CharTokenizer:
    "A stand-in with tiktoken's `encode` signature: one token per character, its code point."
    def encode(self, text, allowed_special=()):
        return [ord(c) for c in text]


def book_pairs(token_ids, max_length, stride):
    "The book's GPTDatasetV1 loop, as printed: the reference our unfold-based windows must equal."
    input_ids, target_ids = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        input_ids.append(torch.tensor(token_ids[i:i + max_length]))
        target_ids.append(torch.tensor(token_ids[i + 1:i + max_length + 1]))
    return input_ids, target_ids


# ---- split_words and build_vocab -------------------------------------------------------------------

def test_split_words_book_examples():
    assert split_words('Hello, world. Is this-- a test?') == ['Hello', ',', 'world', '.', 'Is', 'this', '--', 'a', 'test', '?']
    assert split_words(' \n\t ') == []
    assert split_words('a <|endoftext|> b') == ['a', '<|endoftext|>', 'b']


def test_build_vocab_counts_and_specials(verdict):
    v = build_vocab(verdict)
    assert len(v) == 1_130 and sorted(v.values()) == list(range(1_130))
    v2 = build_vocab(verdict, SPECIAL)
    assert len(v2) == 1_132 and v2['<|endoftext|>'] == 1_130 and v2['<|unk|>'] == 1_131
    assert all(v2[t] == i for t, i in v.items())  # the words keep their ids


def test_build_vocab_special_token_in_text_not_duplicated():
    v = build_vocab('b a <|endoftext|> a', SPECIAL)
    assert v == {'a': 0, 'b': 1, '<|endoftext|>': 2, '<|unk|>': 3}


def test_build_vocab_repeated_special_tokens():
    with pytest.raises(ValueError, match='repeats'):
        build_vocab('a b', ['<|unk|>', '<|unk|>'])


# ---- SimpleTokenizerV1 / V2: bad inputs ------------------------------------------------------------

def test_v1_unknown_word_names_the_word(verdict):
    tok = SimpleTokenizerV1(build_vocab(verdict))
    with pytest.raises(KeyError, match="'Hello' is not in the vocabulary"):
        tok.encode('Hello, do you like tea?')
    with pytest.raises(KeyError, match="'Zanzibar'"):   # the first unknown word, after known ones
        tok.encode('the last he painted Zanzibar and Hello')


@pytest.mark.parametrize('cls', [SimpleTokenizerV1, SimpleTokenizerV2])
@pytest.mark.parametrize('bad', [1_132, 99_999, -1])
def test_decode_unknown_id_names_the_id(verdict, cls, bad):
    tok = cls(build_vocab(verdict, SPECIAL))
    with pytest.raises(KeyError, match=f'token id {bad} is not in the vocabulary'):
        tok.decode([5, bad, 7])


def test_decode_rejects_non_integer_ids(verdict):
    tok = SimpleTokenizerV1(build_vocab(verdict))
    with pytest.raises(TypeError):
        tok.decode([5.0])


def test_decode_accepts_numpy_and_tensor_ids(verdict):
    tok = SimpleTokenizerV1(build_vocab(verdict))
    ids = tok.encode('the last he painted, you know.')
    text = tok.decode(ids)
    assert tok.decode(np.array(ids)) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_v2_needs_unk():
    with pytest.raises(ValueError, match='<\\|unk\\|>'):
        SimpleTokenizerV2(build_vocab('a b c'))


def test_vocab_must_be_one_to_one():
    with pytest.raises(ValueError, match='same id'):
        SimpleTokenizerV1({'a': 0, 'b': 0})


# ---- SimpleTokenizerV1 / V2: round trips -----------------------------------------------------------

@pytest.fixture(scope='module')
def vocab2(verdict):
    return build_vocab(verdict, SPECIAL)


@pytest.mark.parametrize('cls', [SimpleTokenizerV1, SimpleTokenizerV2])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_ids_survive_decode_encode(vocab2, cls, data):
    "Any id sequence decodes to a text that encodes back to the same ids (the whitespace decode drops is not needed)."
    tok = cls(vocab2)
    ids = data.draw(st.lists(st.integers(0, len(vocab2) - 1), max_size=40))
    assert tok.encode(tok.decode(ids)) == ids


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_v2_unknown_words_become_unk(vocab2, data):
    "Words joined by spaces: known words keep their ids, unknown ones become <|unk|>, in place."
    words = [w for w in vocab2 if w.isalpha()]
    unknown = st.text('qxzjQXZJ', min_size=6, max_size=10)     # letter soup no English story contains
    seq = data.draw(st.lists(st.one_of(st.sampled_from(words), unknown), max_size=30))
    tok = SimpleTokenizerV2(vocab2)
    ids = tok.encode(' '.join(seq))
    assert ids == [vocab2.get(w, vocab2['<|unk|>']) for w in seq]
    assert tok.decode(ids) == ' '.join(w if w in vocab2 else '<|unk|>' for w in seq)


def test_v2_book_example(vocab2):
    tok = SimpleTokenizerV2(vocab2)
    text = 'Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace.'
    assert tok.decode(tok.encode(text)) == '<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>.'


def test_v1_and_v2_agree_on_known_text(verdict, vocab2):
    "On text made only of the story's words both tokenizers give the same ids, and the story encodes without error."
    v1, v2 = SimpleTokenizerV1(vocab2), SimpleTokenizerV2(vocab2)
    assert v1.encode(verdict) == v2.encode(verdict)
    assert len(v1.encode(verdict)) == 4_690


# ---- GPTDatasetV1 ----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 120), max_length=st.integers(1, 20), stride=st.integers(1, 25))
def test_dataset_equals_book_loop(n, max_length, stride):
    "Length formula and every pair, against the book's loop, for texts long and too short."
    text = ''.join(chr(65 + i % 50) for i in range(n))
    if n < max_length + 1:
        with pytest.raises(ValueError, match=f'the text has {n} tokens; max_length={max_length} needs at least {max_length + 1}'):
            GPTDatasetV1(text, CharTokenizer(), max_length, stride)
        return
    ds = GPTDatasetV1(text, CharTokenizer(), max_length, stride)
    ref_x, ref_y = book_pairs(CharTokenizer().encode(text), max_length, stride)
    assert len(ds) == len(ref_x) == (n - 1 - max_length) // stride + 1
    for k in range(len(ds)):
        x, y = ds[k]
        assert torch.equal(x, ref_x[k]) and torch.equal(y, ref_y[k])


@pytest.mark.parametrize('max_length,stride', [(1, 1), (4, 1), (4, 4), (256, 128), (256, 256), (100, 333), (5_144, 1)])
def test_dataset_on_the_story(verdict, gpt2, max_length, stride):
    ids = gpt2.encode(verdict)
    n = len(ids)
    ds = GPTDatasetV1(verdict, gpt2, max_length, stride)
    ref_x, ref_y = book_pairs(ids, max_length, stride)
    assert len(ds) == len(ref_x) == (n - 1 - max_length) // stride + 1
    assert torch.equal(ds.input_ids, torch.stack(ref_x)) and torch.equal(ds.target_ids, torch.stack(ref_y))
    # every target is its input shifted by one token
    assert torch.equal(ds.target_ids[:, :-1], ds.input_ids[:, 1:])
    starts = torch.arange(len(ds)) * stride
    assert torch.equal(ds.target_ids[:, -1], torch.tensor(ids)[starts + max_length])
    # the windows start every `stride` tokens, and no further window would fit
    assert torch.equal(ds.input_ids[:, 0], torch.tensor(ids)[starts])
    last = (len(ds) - 1) * stride
    assert last + max_length + 1 <= n < last + stride + max_length + 1


@pytest.mark.parametrize('max_length', [1, 3, 4, 64])
def test_windows_tile_the_text_when_stride_equals_max_length(verdict, gpt2, max_length):
    ids = torch.tensor(gpt2.encode(verdict))
    ds = GPTDatasetV1(verdict, gpt2, max_length, max_length)
    covered = len(ds) * max_length
    assert torch.equal(ds.input_ids.flatten(), ids[:covered])
    assert torch.equal(ds.target_ids.flatten(), ids[1:covered + 1])
    assert 1 <= len(ids) - covered <= max_length   # what is left cannot make another input and target


def test_dataset_exactly_one_window():
    ds = GPTDatasetV1('abcde', CharTokenizer(), max_length=4, stride=3)
    assert len(ds) == 1
    x, y = ds[0]
    assert x.tolist() == [97, 98, 99, 100] and y.tolist() == [98, 99, 100, 101]
    with pytest.raises(ValueError, match='the text has 4 tokens; max_length=4 needs at least 5'):
        GPTDatasetV1('abcd', CharTokenizer(), max_length=4, stride=3)


def test_dataset_empty_text(gpt2):
    with pytest.raises(ValueError, match='the text has 0 tokens; max_length=1 needs at least 2'):
        GPTDatasetV1('', gpt2, 1, 1)


@pytest.mark.parametrize('name,max_length,stride', [
    ('max_length', 0, 1), ('max_length', -4, 1), ('max_length', 2.5, 1), ('max_length', '4', 1), ('max_length', None, 1),
    ('stride', 4, 0), ('stride', 4, -1), ('stride', 4, 1.0), ('stride', 4, None)])
def test_dataset_bad_window_settings(name, max_length, stride):
    with pytest.raises(ValueError, match=f'{name} must be a positive integer'):
        GPTDatasetV1('abcdefghij' * 10, CharTokenizer(), max_length, stride)


def test_dataset_accepts_numpy_ints():
    ds = GPTDatasetV1('abcdefghij', CharTokenizer(), np.int64(4), np.int32(2))
    assert len(ds) == 3


def test_dataset_items(gpt2):
    ds = GPTDatasetV1('Hello, world. <|endoftext|> In the sunlit terraces of the palace.', gpt2, 4, 2)
    x, y = ds[-1]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4,)
    assert 50256 in ds.token_ids.tolist()   # '<|endoftext|>' is allowed, as in the book
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_windows_are_views(verdict, gpt2):
    "The windows share the token tensor's memory instead of copying each one."
    ds = GPTDatasetV1(verdict, gpt2, 256, 1)
    ptr = ds.token_ids.untyped_storage().data_ptr()
    assert ds.input_ids.untyped_storage().data_ptr() == ptr and ds.target_ids.untyped_storage().data_ptr() == ptr


# ---- create_dataloader_v1 --------------------------------------------------------------------------

def test_loader_defaults_are_the_books(verdict):
    dl = create_dataloader_v1(verdict)
    assert dl.batch_size == 4 and dl.drop_last and dl.num_workers == 0
    assert isinstance(dl.sampler, RandomSampler)
    assert dl.dataset.input_ids.shape[1] == 256
    assert len(dl.dataset) == (5_145 - 1 - 256) // 128 + 1
    x, y = next(iter(dl))
    assert x.shape == y.shape == (4, 256)


def test_loader_default_tokenizer_is_gpt2(verdict, gpt2):
    dl = create_dataloader_v1(verdict, batch_size=2, max_length=8, stride=8, shuffle=False)
    assert torch.equal(dl.dataset.token_ids, torch.tensor(gpt2.encode(verdict)))


def test_loader_custom_tokenizer():
    dl = create_dataloader_v1('abcdefghij', batch_size=2, max_length=3, stride=3, shuffle=False, tokenizer=CharTokenizer())
    x, y = next(iter(dl))
    assert x.tolist() == [[97, 98, 99], [100, 101, 102]] and y.tolist() == [[98, 99, 100], [101, 102, 103]]


@pytest.mark.parametrize('batch_size', [1, 3, 8, 7])
def test_loader_drop_last(verdict, batch_size):
    n_windows = (5_145 - 1 - 16) // 16 + 1   # 321
    dl = create_dataloader_v1(verdict, batch_size=batch_size, max_length=16, stride=16, shuffle=False, drop_last=True)
    shapes = [tuple(x.shape) for x, _ in dl]
    assert len(shapes) == len(dl) == n_windows // batch_size
    assert set(shapes) == {(batch_size, 16)}
    dl = create_dataloader_v1(verdict, batch_size=batch_size, max_length=16, stride=16, shuffle=False, drop_last=False)
    shapes = [tuple(x.shape) for x, _ in dl]
    assert len(shapes) == -(-n_windows // batch_size)
    assert shapes[-1] == (n_windows % batch_size or batch_size, 16)


def test_loader_shuffle_keeps_every_window(verdict):
    ordered = create_dataloader_v1(verdict, batch_size=5, max_length=8, stride=8, shuffle=False, drop_last=False)
    torch.manual_seed(0)
    shuffled = create_dataloader_v1(verdict, batch_size=5, max_length=8, stride=8, shuffle=True, drop_last=False)
    assert isinstance(ordered.sampler, SequentialSampler)
    batches = list(shuffled)   # one epoch: each pass over a shuffled loader has its own order
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys[:, :-1], xs[:, 1:])   # pairs stay pairs
    key = lambda t: sorted(map(tuple, t.tolist()))
    assert key(xs) == key(ordered.dataset.input_ids)
    assert not torch.equal(xs, ordered.dataset.input_ids)


def test_loader_that_would_be_empty():
    with pytest.raises(ValueError, match='gives 2 windows.*fewer than batch_size=4'):
        create_dataloader_v1('abcdefghi', batch_size=4, max_length=4, stride=4, tokenizer=CharTokenizer())
    dl = create_dataloader_v1('abcdefghi', batch_size=4, max_length=4, stride=4, drop_last=False, tokenizer=CharTokenizer())
    assert [tuple(x.shape) for x, _ in dl] == [(2, 4)]


def test_loader_too_short_text():
    with pytest.raises(ValueError, match='the text has 3 tokens; max_length=4 needs at least 5'):
        create_dataloader_v1('Too short.', max_length=4, stride=4)
    with pytest.raises(ValueError, match='max_length must be a positive integer'):
        create_dataloader_v1('Long enough text for the loader.', max_length=0)
    with pytest.raises(ValueError, match='batch_size must be a positive integer'):
        create_dataloader_v1('Long enough text for the loader.', batch_size=0, max_length=2, stride=2)


def test_loader_with_workers(verdict):
    kw = {'batch_size': 8, 'max_length': 32, 'stride': 16, 'shuffle': False}
    a = [x for x, _ in create_dataloader_v1(verdict, **kw)]
    b = [x for x, _ in create_dataloader_v1(verdict, num_workers=2, **kw)]
    assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))
