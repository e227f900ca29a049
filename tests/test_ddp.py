"The trainer under torchrun: 2 CPU processes with Gloo, DDP and FSDP, against one process with the same global batch."
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

from llm_from_scratch.gpt import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.trainer import TokenWindows, Trainer, TrainConfig, load_checkpoint

TINY = {**GPT_CONFIG_124M, 'vocab_size': 97, 'context_length': 16, 'emb_dim': 32, 'n_heads': 4, 'n_layers': 2, 'drop_rate': 0.0}
TRAIN = {'max_steps': 4, 'batch_size': 2, 'lr': 3e-3, 'warmup_steps': 1, 'device': 'cpu', 'progress': True, 'sample_interval': 2,
         'sample_tokens': 3}

# Each mode trains 2 steps, then a new Trainer with other initial weights resumes from the checkpoint for 2 more.
WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    import llm_from_scratch.trainer as T
    from llm_from_scratch.gpt import GPTModel

    out, model_cfg, train_cfg = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    rank, world_size, _ = T.setup_distributed()

    class CharTokenizer:  # ids below the tiny model's vocabulary, for the samples
        def encode(self, text):
            return [ord(c) % 97 for c in text]
        def decode(self, ids):
            return ''.join(chr(32 + i) for i in ids)

    real_save = T.save_checkpoint
    for mode in ('ddp', 'fsdp'):
        def recording_save(*args, **kwargs):
            with open(f'{out}/saves-{mode}-rank{rank}.txt', 'a') as f:
                f.write('save\\n')
            return real_save(*args, **kwargs)
        T.save_checkpoint = recording_save

        class Recording(torch.utils.data.Dataset):
            def __init__(self, d):
                self.d, self.seen = d, []
            def __len__(self):
                return len(self.d)
            def __getitem__(self, i):
                self.seen.append(int(i))
                return self.d[i]

        data = Recording(T.TokenWindows(np.load(f'{out}/tokens.npy'), 16))
        cfg = T.TrainConfig(**train_cfg, fsdp=mode == 'fsdp')
        torch.manual_seed(123)
        first = T.Trainer(GPTModel(model_cfg), data, None, cfg, run_dir=f'{out}/run-{mode}', tokenizer=CharTokenizer())
        with open(f'{out}/wrapper-{mode}-rank{rank}.txt', 'w') as f:
            f.write(f'{first.fsdp} {type(first.model).__name__}')
        first.fit(steps=2)
        torch.manual_seed(999)
        T.Trainer(GPTModel(model_cfg), data, None, cfg, run_dir=f'{out}/run-{mode}', tokenizer=CharTokenizer()).fit(
            resume=f'{out}/run-{mode}')
        with open(f'{out}/seen-{mode}-rank{rank}.json', 'w') as f:
            json.dump(data.seen, f)

    # appendix A's example, as the book's DDP script runs it (Gloo instead of NCCL)
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    X_train = torch.tensor([[-1.2, 3.1], [-0.9, 2.9], [-0.5, 2.6], [2.3, -1.1], [2.7, -1.5]])
    y_train = torch.tensor([0, 0, 0, 1, 1])
    train_ds = T.ToyDataset(X_train, y_train)
    loader = DataLoader(train_ds, batch_size=2, shuffle=False, drop_last=True, sampler=DistributedSampler(train_ds))
    torch.manual_seed(123 + rank)  # different initial weights on purpose: DDP broadcasts rank 0's
    model = DDP(T.NeuralNetwork(num_inputs=2, num_outputs=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for features, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save({'acc': T.compute_accuracy(model, loader), 'weights': model.module.state_dict()}, f'{out}/toy-rank{rank}.pt')
    T.cleanup_distributed()
''')


def tokens(n=16 * 40 + 1):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(0)).numpy().astype(np.uint16)


@pytest.fixture(scope='module')
def torchrun(tmp_path_factory):
    "Run the worker once on 2 processes; return its folder and torchrun's per-rank logs."
    out = tmp_path_factory.mktemp('ddp')
    np.save(out/'tokens.npy', tokens())
    (out/'worker.py').write_text(WORKER)
    logs = out/'logs'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--redirects', '3',
           '--log-dir', str(logs), str(out/'worker.py'), str(out), json.dumps(TINY), json.dumps(TRAIN)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if r.returncode != 0 and 'SIGABRT' in r.stderr:
        # Rarely, on a loaded machine, Gloo aborts a worker while the processes shut down ("terminate called without an
        # active exception"), after the training under test has finished. One clean run from scratch is then required.
        shutil.rmtree(logs, ignore_errors=True)
        for f in out.glob('*-rank*.*'):
            f.unlink()
        for d in out.glob('run-*'):
            shutil.rmtree(d)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    per_rank = {int(p.parent.name): p for p in logs.rglob('stderr.log')}
    assert r.returncode == 0, r.stdout + r.stderr + ''.join(p.read_text()[-3000:] for p in per_rank.values())
    return out, per_rank


@pytest.fixture(scope='module')
def single_process():
    "The same run in one process with the global batch (2 processes × 2): losses, weights and the windows it read."
    seen = []

    class Recording(TokenWindows):
        def __getitem__(self, i):
            seen.append(int(i))
            return super().__getitem__(i)
    torch.manual_seed(123)
    cfg = TrainConfig(**{**TRAIN, 'batch_size': 4, 'progress': False, 'sample_interval': 0})
    t = Trainer(GPTModel(TINY), Recording(tokens(), 16), None, cfg)
    history = t.fit()
    return history['loss'], t.raw.state_dict(), seen


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_two_processes_equal_one_with_the_global_batch(torchrun, single_process, mode):
    out, _ = torchrun
    losses, weights, _ = single_process
    log = [json.loads(line) for line in (out/f'run-{mode}'/'log.jsonl').read_text().splitlines()]
    np.testing.assert_allclose([x['loss'] for x in log if 'loss' in x], losses, rtol=1e-5)
    model = GPTModel(TINY)
    assert load_checkpoint(out/f'run-{mode}', model)['path'].name == 'step-00000004'
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_ranks_read_disjoint_shards_of_the_global_batches(torchrun, single_process, mode):
    out, _ = torchrun
    seen = [json.loads((out/f'seen-{mode}-rank{r}.json').read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 4 * 2                 # 4 steps of 2 windows each
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(single_process[2])  # together: the single process's windows


def test_fsdp_really_shards(torchrun):
    "The FSDP run is sharded (no silent fall-back to DDP); the DDP run is wrapped by DistributedDataParallel."
    out, _ = torchrun
    for rank in range(2):
        assert (out/f'wrapper-fsdp-rank{rank}.txt').read_text().split()[0] == 'True'
        assert (out/f'wrapper-ddp-rank{rank}.txt').read_text() == 'False DistributedDataParallel'


def test_only_rank_0_writes_checkpoints_and_logs(torchrun):
    out, per_rank = torchrun
    for mode in ('ddp', 'fsdp'):
        assert (out/f'saves-{mode}-rank0.txt').read_text().count('save') == 2  # after step 2 and at the end
        assert not (out/f'saves-{mode}-rank1.txt').exists()
    rank0 = per_rank[0].read_text() + (per_rank[0].parent/'stdout.log').read_text()
    rank1 = per_rank[1].read_text() + (per_rank[1].parent/'stdout.log').read_text()
    assert 'resumed from' in rank0 and 'tok/s' in rank0
    assert rank0.count("step 2: '") == 2 and rank0.count("step 4: '") == 2  # samples: DDP (rank 0 alone) and FSDP (all ranks)
    assert 'resumed from' not in rank1 and 'tok/s' not in rank1 and "step 2: '" not in rank1


def test_single_process_needs_no_process_group():
    assert not dist.is_initialized()
    t = Trainer(GPTModel(TINY), TokenWindows(tokens(), 16), None, TrainConfig(**{**TRAIN, 'max_steps': 1, 'warmup_steps': 0}))
    assert (t.rank, t.world_size, t.ddp, t.fsdp) == (0, 1, None, False)  # no wrapper around a single process


def test_appendix_a_toy_example_under_ddp(torchrun):
    "The book's 5-example classifier on 2 processes: both ranks end with the same weights and classify their shares right."
    out, _ = torchrun
    r0, r1 = (torch.load(out/f'toy-rank{r}.pt') for r in range(2))
    assert r0['acc'] == r1['acc'] == 1.0
    for k in r0['weights']:
        assert torch.equal(r0['weights'][k], r1['weights'][k]), k
