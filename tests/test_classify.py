"Chapter 6 against independent references: the book's own code, per-example forward passes, PyTorch's cross-entropy; bad inputs."
import argparse
import io
import json
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from llm_from_scratch.classify import (
    SPAM_LABELS,
    SpamDataset,
    add_classification_head,
    add_cli_parser,
    calc_accuracy_loader,
    calc_classification_loss_batch,
    calc_classification_loss_loader,
    class_probabilities,
    classify_review,
    classify_text,
    count_parameters,
    create_balanced_dataset,
    download_and_unzip_spam_data,
    evaluate_classifier,
    last_token_logits,
    load_base_model,
    load_classifier,
    load_shakespeare_gpt,
    plot_values,
    prepare_spam_csvs,
    random_split,
    read_labeled_tsv,
    save_classifier,
    train_classifier_simple,
)
from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.trainer import CheckpointError, load_checkpoint, save_checkpoint

from conftest import shared_data

PAD = 50256
TINY = {**GPT_CONFIG_124M, 'context_length': 64, 'emb_dim': 32, 'n_heads': 2, 'n_layers': 2, 'drop_rate': 0.0}
TOK = tiktoken.get_encoding('gpt2')


def tiny_classifier(seed=0, **cfg):
    torch.manual_seed(seed)
    return add_classification_head(GPTModel({**TINY, **cfg}), num_classes=2, trainable_blocks=None).eval()


def padded_batch(texts, length):
    ids = [TOK.encode(t)[:length] for t in texts]
    return torch.tensor([i + [PAD] * (length - len(i)) for i in ids]), ids


# --- the book's code, copied as the reference -------------------------------------------------------------
def book_create_balanced_dataset(df):
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    return pd.concat([ham_subset, df[df["Label"] == "spam"]])


def book_random_split(df, train_frac, validation_frac):
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def book_calc_accuracy_loader(data_loader, model, device, num_batches=None):
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            with torch.no_grad():
                logits = model(input_batch)[:, -1, :]
            predicted_labels = torch.argmax(logits, dim=-1)
            num_examples += predicted_labels.shape[0]
            correct_predictions += (predicted_labels == target_batch).sum().item()
        else:
            break
    return correct_predictions / num_examples


# --- data -------------------------------------------------------------------------------------------------
def test_download_and_unzip_uses_the_cache_and_skips_a_second_time(tmp_path):
    shared_data()
    out = io.StringIO()
    with redirect_stdout(out):
        path = download_and_unzip_spam_data(extracted_path=tmp_path/'sms')
        again = download_and_unzip_spam_data(extracted_path=tmp_path/'sms')
    assert path == again == tmp_path/'sms'/'SMSSpamCollection.tsv'
    assert 'already exists' in out.getvalue()
    assert len(path.read_text(encoding='utf-8').splitlines()) == 5574
    assert not list((tmp_path/'sms').glob('.*tmp'))


def test_download_and_unzip_refuses_a_zip_without_the_data_file(tmp_path):
    bad = tmp_path/'other.zip'
    with zipfile.ZipFile(bad, 'w') as zf:
        zf.writestr('README', 'not the data')
    with pytest.raises(ValueError, match='holds no SMSSpamCollection'):
        download_and_unzip_spam_data(url=bad.as_uri(), zip_path=tmp_path/'copy.zip', extracted_path=tmp_path/'x')
    assert not (tmp_path/'x'/'SMSSpamCollection.tsv').exists()


def test_balanced_split_matches_the_book_code():
    shared_data()
    with redirect_stdout(io.StringIO()):
        path = download_and_unzip_spam_data()
    df = pd.read_csv(path, sep='\t', header=None, names=['Label', 'Text'])
    ours, book = create_balanced_dataset(df), book_create_balanced_dataset(df)
    pd.testing.assert_frame_equal(ours, book)
    for a, b in zip(random_split(ours, 0.7, 0.1), book_random_split(book, 0.7, 0.1)):
        pd.testing.assert_frame_equal(a, b)
    paths = prepare_spam_csvs()
    test = pd.read_csv(paths['test'])
    assert len(test) == 300 and set(test['Label']) == {0, 1}
    assert paths['train'].parent == Path(path).parent


@pytest.mark.parametrize('fracs', [(0, 0.1), (0.7, -0.1), (0.8, 0.3)])
def test_random_split_refuses_impossible_fractions(fracs):
    with pytest.raises(ValueError, match='at most 1'):
        random_split(pd.DataFrame({'Label': [0, 1], 'Text': ['a', 'b']}), *fracs)


def test_read_labeled_tsv_reports_every_bad_line(tmp_path):
    p = tmp_path/'data.tsv'
    lines = ['ham\tfine'] + ['hma\ttypo'] * 12 + ['spam no tab', 'spam\t   ', '', 'SPAM\tcase matters', 'spam\tgood\r']
    p.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    with pytest.raises(ValueError) as e:
        read_labeled_tsv(p)
    msg = str(e.value)
    assert "label 'hma' (not one of ham, spam) on lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 2 more" in msg
    assert "label 'SPAM' (not one of ham, spam) on line 17" in msg
    assert 'no tab between label and text on line 14' in msg
    assert 'an empty text on line 15' in msg


def test_read_labeled_tsv_reads_good_files_line_by_line(tmp_path):
    p = tmp_path/'data.tsv'
    p.write_text('ham\tHe said "hi\r\n\nspam\tWIN "big" now\r\n', encoding='utf-8')
    df = read_labeled_tsv(p)
    assert df.to_dict('list') == {'Label': ['ham', 'spam'], 'Text': ['He said "hi', 'WIN "big" now']}
    (tmp_path/'empty.tsv').write_text('\n\n', encoding='utf-8')
    with pytest.raises(ValueError, match='no labelled lines'):
        read_labeled_tsv(tmp_path/'empty.tsv')
    (tmp_path/'pos.tsv').write_text('pos\tgreat\n', encoding='utf-8')
    assert read_labeled_tsv(tmp_path/'pos.tsv', labels=('neg', 'pos'))['Label'].tolist() == ['pos']


def test_spam_dataset_pads_truncates_and_refuses(tmp_path):
    texts = ['short', 'a somewhat longer message than the first', 'WIN ' * 40]
    df = pd.DataFrame({'Label': [0, 1, 1], 'Text': texts})
    ds = SpamDataset(df, TOK)
    assert ds.max_length == max(len(TOK.encode(t)) for t in texts)
    x, y = ds[0]
    assert x.tolist() == TOK.encode('short') + [PAD] * (ds.max_length - 1) and y.item() == 0
    cut = SpamDataset(df, TOK, max_length=5, pad_token_id=0)
    assert [cut[i][0].tolist() for i in range(3)] == [TOK.encode('short') + [0] * 4, TOK.encode(texts[1])[:5], TOK.encode(texts[2])[:5]]
    df.to_csv(tmp_path/'d.csv', index=None)
    assert SpamDataset(tmp_path/'d.csv', TOK).encoded_texts == ds.encoded_texts
    pd.DataFrame({'Label': [0, 1], 'Text': ['ok', None]}).to_csv(tmp_path/'e.csv', index=None)
    with pytest.raises(ValueError, match='row 1'):
        SpamDataset(tmp_path/'e.csv', TOK)
    with pytest.raises(ValueError, match='no Label column'):
        SpamDataset(pd.DataFrame({'Text': ['x']}), TOK)
    with pytest.raises(ValueError, match='integers'):
        SpamDataset(pd.DataFrame({'Label': ['spam'], 'Text': ['x']}), TOK)


# --- logits, loss, accuracy -----------------------------------------------------------------------------
def test_last_token_logits_equal_each_text_alone():
    model = tiny_classifier()
    texts = ['Do you have time', 'Free entry in 2 a wkly comp to win FA Cup final tkts', 'ok']
    batch, ids = padded_batch(texts, 40)
    with torch.no_grad():
        ours = last_token_logits(model, batch)
        alone = torch.cat([model(torch.tensor([i]))[:, -1, :] for i in ids])  # the reference: no padding at all
        book = last_token_logits(model, batch, 'book')
        torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(book, model(batch)[:, -1, :])
    assert not torch.allclose(book, ours, atol=1e-3)


def test_last_token_logits_refuses_bad_input():
    model = tiny_classifier()
    with pytest.raises(ValueError, match='row 1 of the batch is all padding'):
        last_token_logits(model, torch.tensor([[1, 2, PAD], [PAD, PAD, PAD]]))
    with pytest.raises(ValueError, match='must be one of'):
        last_token_logits(model, torch.tensor([[1, 2]]), 'first')
    with pytest.raises(ValueError, match='context_length'):
        last_token_logits(model, torch.ones(1, 65, dtype=torch.long), 'book')


def make_loader(n=24, length=20, seed=0, batch_size=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    x = torch.randint(0, 1000, (n, length), generator=g)
    x[torch.arange(length)[None, :] >= lengths[:, None]] = PAD
    y = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(list(zip(x, y)), batch_size=batch_size)


def test_accuracy_and_loss_against_references():
    model = tiny_classifier(seed=1)
    loader = make_loader()
    assert calc_accuracy_loader(loader, model, 'cpu', last_token='book') == book_calc_accuracy_loader(loader, model, 'cpu')
    assert calc_accuracy_loader(loader, model, 'cpu', num_batches=2, last_token='book') == \
        book_calc_accuracy_loader(loader, model, 'cpu', num_batches=2)
    xs, ys = zip(*[(x, y) for x, y in loader])
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        per_example = torch.cat([model(row[row != PAD][None])[:, -1, :] for row in x])  # (n, 2), one text at a time
        loss = calc_classification_loss_batch(x, y, model, 'cpu')
        torch.testing.assert_close(loss, F.cross_entropy(per_example, y), atol=1e-5, rtol=1e-5)
        expected_acc = (per_example.argmax(-1) == y).float().mean().item()
        assert calc_accuracy_loader(loader, model, 'cpu') == pytest.approx(expected_acc)
        batch_losses = [F.cross_entropy(per_example[i:i + 4], y[i:i + 4]).item() for i in range(0, 24, 4)]
        assert calc_classification_loss_loader(loader, model, 'cpu') == pytest.approx(sum(batch_losses) / 6, abs=1e-5)
        assert calc_classification_loss_loader(loader, model, 'cpu', num_batches=99) == pytest.approx(sum(batch_losses) / 6, abs=1e-5)
        train, val = evaluate_classifier(model, loader, loader, 'cpu', eval_iter=2)
        assert train == val == pytest.approx(sum(batch_losses[:2]) / 2, abs=1e-5)
    empty = DataLoader([], batch_size=4)
    with pytest.raises(ValueError, match='no batches'):
        calc_classification_loss_loader(empty, model, 'cpu')
    with pytest.raises(ValueError, match='no batches'):
        calc_accuracy_loader(empty, model, 'cpu')


def test_train_classifier_simple_learns_a_token_rule():
    "Spam when token 7 occurs: the loss falls and the accuracy rises, and the lists have the book's lengths."
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 1000, (64, 12), generator=g)
    y = torch.randint(0, 2, (64,), generator=g)
    x[y == 1, 3] = 7
    torch.manual_seed(0)
    loader = DataLoader(list(zip(x, y)), batch_size=8, shuffle=True)
    model = tiny_classifier(seed=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    with redirect_stdout(io.StringIO()) as log:
        train_losses, val_losses, train_accs, val_accs, seen = train_classifier_simple(
            model, loader, loader, optimizer, 'cpu', num_epochs=6, eval_freq=4, eval_iter=8)
    assert seen == 6 * 64 and len(train_losses) == len(val_losses) == 12 and len(train_accs) == 6
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert train_accs[-1] >= 0.9
    assert log.getvalue().startswith('Ep 1 (Step 000000): Train loss')
    with pytest.raises(ValueError, match='eval_freq'):
        train_classifier_simple(model, loader, loader, optimizer, 'cpu', 1, 0, 1)


def test_plot_values_returns_a_figure_with_two_axes():
    fig = plot_values(torch.linspace(0, 2, 3), torch.linspace(0, 100, 3), [0.7, 0.5, 0.3], [0.8, 0.6, 0.4], label='accuracy')
    assert len(fig.axes) == 2 and fig.axes[0].get_ylabel() == 'Accuracy'


# --- the head ---------------------------------------------------------------------------------------------
def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize('blocks', [0, 1, 2])
def test_add_classification_head_freezes_as_the_book(blocks):
    torch.manual_seed(0)
    model = add_classification_head(GPTModel(TINY), num_classes=3, trainable_blocks=blocks)
    expected = {'out_head.weight', 'out_head.bias', 'final_norm.scale', 'final_norm.shift'}
    for i in range(2 - blocks, 2):
        expected |= {f'trf_blocks.{i}.{n}' for n, _ in model.trf_blocks[i].named_parameters()}
    assert trainable_names(model) == expected
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 3)


def test_add_classification_head_options_and_devices():
    torch.manual_seed(0)
    model = add_classification_head(GPTModel(TINY), trainable_blocks=None)
    assert count_parameters(model) == count_parameters(model, trainable_only=False)
    model = add_classification_head(GPTModel(TINY).to(torch.bfloat16), trainable_blocks=1)
    assert model.out_head.weight.dtype == torch.bfloat16
    for bad in (3, -1):
        with pytest.raises(ValueError, match='trainable_blocks'):
            add_classification_head(GPTModel(TINY), trainable_blocks=bad)
    with pytest.raises(ValueError, match='num_classes'):
        add_classification_head(GPTModel(TINY), num_classes=1)
    torch.manual_seed(5)
    a = add_classification_head(GPTModel(TINY)).out_head.weight
    torch.manual_seed(5)
    GPTModel(TINY)
    b = nn.Linear(32, 2).weight  # the book: the head is the next draw after building the model
    torch.testing.assert_close(a, b)


# --- classifying texts --------------------------------------------------------------------------------------
def test_classify_review_and_text():
    model = tiny_classifier(seed=3)
    text = 'You are a winner you have been specially selected to receive $1000 cash or a $2000 award.'
    probas = class_probabilities(text, model, TOK)
    with torch.no_grad():
        ref = torch.softmax(model(torch.tensor([TOK.encode(text)]))[0, -1], -1)
    torch.testing.assert_close(probas, ref)
    expected = 'spam' if ref.argmax() == 1 else 'not spam'
    assert classify_review(text, model, TOK, 'cpu') == expected
    assert classify_review(text, model, TOK, 'cpu', max_length=60) == expected  # padding does not matter
    label, prob = classify_text(model, text)
    assert label == SPAM_LABELS[int(ref.argmax())] and prob == pytest.approx(ref.max().item(), abs=1e-6)
    label, _ = classify_text(model, text, meta={'labels': ['no', 'yes']})
    assert label in ('no', 'yes')
    for empty in ('', '  \n', None):
        with pytest.raises(ValueError, match='empty'):
            classify_review(empty, model, TOK, 'cpu')


def test_long_texts_are_truncated_to_the_context():
    model = tiny_classifier(seed=4)
    long_text = ' '.join(str(i) for i in range(200))
    ids = TOK.encode(long_text)
    assert len(ids) > 64
    with torch.no_grad():
        ref = torch.softmax(model(torch.tensor([ids[:64]]))[0, -1], -1)
        torch.testing.assert_close(class_probabilities(long_text, model, TOK), ref)
        torch.testing.assert_close(class_probabilities(long_text, model, TOK, max_length=500), ref)
        ref10 = torch.softmax(model(torch.tensor([ids[:10]]))[0, -1], -1)
        torch.testing.assert_close(class_probabilities(long_text, model, TOK, max_length=10), ref10)
    assert classify_review(long_text, model, TOK, 'cpu', max_length=120, last_token='book') in ('spam', 'not spam')


# --- saving and loading -----------------------------------------------------------------------------------
def test_save_and_load_classifier_round_trip(tmp_path):
    model = tiny_classifier(seed=5)
    path = save_classifier(model, tmp_path/'clf', max_length=40, step=7, info={'note': 'test'})
    assert path == tmp_path/'clf'/'step-00000007' and (tmp_path/'clf'/'latest').is_file()
    assert not list((tmp_path/'clf').glob('.tmp-*'))
    loaded, tok, meta = load_classifier(tmp_path/'clf', device='cpu')
    assert meta['labels'] == ['ham', 'spam'] and meta['max_length'] == 40 and meta['info'] == {'note': 'test'}
    assert not loaded.training
    x = torch.tensor([TOK.encode('hello there')])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert classify_text(loaded, 'hello there', tok, meta) == classify_text(model, 'hello there', meta=meta)
    assert json.loads((path/'config.json').read_text())['classifier']['last_token'] == 'non_pad'


def test_save_classifier_refuses_what_it_cannot_load(tmp_path):
    model = tiny_classifier()
    with pytest.raises(ValueError, match='3 labels'):
        save_classifier(model, tmp_path/'a', labels=('a', 'b', 'c'))
    with pytest.raises(ValueError, match='last_token'):
        save_classifier(model, tmp_path/'a', last_token='first')
    model.trf_blocks[0].att.W_query.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match='merge LoRA'):
        save_classifier(model, tmp_path/'a')
    with pytest.raises(ValueError, match='GPTModel'):
        save_classifier(nn.Linear(2, 2), tmp_path/'a')
    assert not (tmp_path/'a').exists() or not list((tmp_path/'a').glob('step-*'))


def test_load_classifier_refuses_damaged_and_foreign_checkpoints(tmp_path):
    save_checkpoint(tmp_path/'lm', GPTModel(TINY), {'step': 1}, {'model': TINY})
    with pytest.raises(CheckpointError, match='not a classifier'):
        load_classifier(tmp_path/'lm')
    with pytest.raises(CheckpointError, match='no such'):
        load_classifier(tmp_path/'missing')
    path = save_classifier(tiny_classifier(), tmp_path/'clf')
    data = (path/'model.safetensors').read_bytes()
    (path/'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        load_classifier(tmp_path/'clf')


# --- base models ------------------------------------------------------------------------------------------
def test_load_base_model_from_a_trainer_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(TINY)
    save_checkpoint(tmp_path/'run', model, {'step': 3}, {'model': TINY})
    loaded = load_base_model(tmp_path/'run', device='cpu', drop_rate=0.2)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    assert {m.p for m in loaded.modules() if isinstance(m, nn.Dropout)} == {0.2} and loaded.cfg['drop_rate'] == 0.2
    assert load_base_model(model, device='cpu', drop_rate=None) is model
    with pytest.raises(ValueError, match='neither a GPT-2 model name'):
        load_base_model(tmp_path/'nothing-here')


def test_load_shakespeare_gpt_trains_once_then_loads(tmp_path):
    shared_data()
    cfg = {**TINY, 'context_length': 16, 'emb_dim': 16}
    with redirect_stdout(io.StringIO()):
        first = load_shakespeare_gpt(steps=2, cfg=cfg, run_dir=tmp_path/'run', eval_batches=1, lr=1e-2)
    ckpt = tmp_path/'run'/'step-00000002'
    stamp = (ckpt/'model.safetensors').stat().st_mtime_ns
    second = load_shakespeare_gpt(steps=2, cfg=cfg, run_dir=tmp_path/'run')
    assert (ckpt/'model.safetensors').stat().st_mtime_ns == stamp  # not trained again
    torch.testing.assert_close(first.state_dict(), second.state_dict())
    state = load_checkpoint(tmp_path/'run')['state']
    assert state['step'] == 2 and len(state['history']['loss']) == 2
    assert (tmp_path/'home'/'tokens'/'tinyshakespeare.bin').is_file()  # tokenized once, into the data home


# --- the command line -------------------------------------------------------------------------------------
def run_cli(argv):
    "`llm-from-scratch ARGV` through the CLI's entry point: (status, stdout, stderr)."
    from llm_from_scratch.cli import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def cli_parser():
    "A parser with only this module's subcommands, built as the CLI builds its own."
    p = argparse.ArgumentParser(prog='llm-from-scratch')
    add_cli_parser(p.add_subparsers(dest='command'))
    return p


@pytest.fixture
def tiny_run(tmp_path):
    "A tiny trainer checkpoint to fine-tune and a small ham/spam file."
    torch.manual_seed(0)
    save_checkpoint(tmp_path/'base', GPTModel(TINY), {'step': 0}, {'model': TINY})
    lines = [f'spam\tWIN a FREE prize {i}, txt CLAIM to 8{i}0' for i in range(15)]
    lines += [f'ham\tsee you at {i} for dinner?' for i in range(15)]
    (tmp_path/'data.tsv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return tmp_path/'base', tmp_path/'data.tsv'


def test_cli_finetune_classifier_then_classify(tiny_run, tmp_path):
    base, tsv = tiny_run
    code, out, err = run_cli(['finetune-classifier', '--data', tsv, '--base', base, '--epochs', 1, '--lr', 1e-3,
                              '--batch-size', 4, '--out', tmp_path/'clf', '--device', 'cpu'])
    assert code == 0, err
    assert 'Test accuracy' in out and 'llm-from-scratch classify' in out
    model, tok, meta = load_classifier(tmp_path/'clf', device='cpu')
    info = meta['info']
    assert (info['epochs'], info['lr'], info['data'], info['trainable_blocks']) == (1, 1e-3, str(tsv), 1)  # the book's block
    assert meta['max_length'] <= TINY['context_length']
    text = 'WIN a FREE prize now'
    code, out, err = run_cli(['classify', tmp_path/'clf', text])
    assert code == 0, err
    label, prob = out.split()
    ref_label, ref_prob = classify_text(model, text, tok, meta)
    assert label == ref_label and label in SPAM_LABELS and float(prob) == pytest.approx(ref_prob, abs=1e-3)
    assert 0.5 <= float(prob) <= 1


def test_cli_finetune_classifier_with_lora_through_the_parser(tiny_run, tmp_path):
    base, tsv = tiny_run
    args = cli_parser().parse_args(['finetune-classifier', '--data', str(tsv), '--base', str(base), '--epochs', '1',
                                    '--batch-size', '4', '--lora-rank', '2', '--lora-alpha', '4', '--last-token', 'book',
                                    '--out', str(tmp_path/'lora'), '--device', 'cpu', '--quiet'])
    with redirect_stdout(io.StringIO()) as out:
        assert args.func(args) == 0
    saved = Path(out.getvalue().strip())
    assert saved.parent == tmp_path/'lora'
    model, tok, meta = load_classifier(saved, device='cpu')  # merged: a plain GPTModel
    assert type(model.trf_blocks[0].att.W_query) is nn.Linear
    assert (meta['info']['lora_rank'], meta['info']['lora_alpha'], meta['last_token']) == (2, 4.0, 'book')
    assert (meta['info']['lr'], meta['info']['epochs']) == (5e-5, 1)  # appendix E's learning rate for a checkpoint base
    args = cli_parser().parse_args(['finetune-classifier', '--trainable-blocks', 'all'])
    assert args.trainable_blocks == 'all' and args.base == 'shakespeare' and args.data == 'sms'
    with redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        cli_parser().parse_args(['finetune-classifier', '--trainable-blocks', 'some'])


def test_cli_reports_bad_input_in_one_line(tiny_run, tmp_path):
    base, tsv = tiny_run
    bad = tmp_path/'bad.tsv'
    bad.write_text('ham\thello\nspma\tWIN\nham\tok\nSPAM\tfree\n', encoding='utf-8')
    code, out, err = run_cli(['finetune-classifier', '--data', bad, '--base', base, '--device', 'cpu'])
    assert code == 2 and err.count('\n') == 1
    assert "label 'spma'" in err and 'line 2' in err and 'line 4' in err
    code, _, err = run_cli(['classify', tmp_path/'missing', 'hello'])
    assert code == 2 and err.count('\n') == 1 and 'no such checkpoint' in err
    code, _, err = run_cli(['classify', base, 'hello'])  # a language model, not a classifier
    assert code == 2 and 'not a classifier' in err
    path = save_classifier(tiny_classifier(), tmp_path/'clf')
    code, _, err = run_cli(['classify', path, '  '])
    assert code == 2 and 'empty' in err
    for argv, message in [(['--data', tmp_path/'nothing.tsv'], "neither 'sms' nor a file"), (['--epochs', 0], '--epochs'),
                          (['--lr', -1], '--lr'), (['--lora-rank', 0], '--lora-rank'),
                          (['--base', tmp_path/'missing-run'], 'neither a GPT-2 model name')]:
        code, _, err = run_cli(['finetune-classifier', '--data', tsv, '--base', base, '--device', 'cpu', *argv])
        assert code == 2 and message in err and err.count('\n') == 1, (argv, err)
