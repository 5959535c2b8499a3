"""fit under torchrun: two CPU processes on the gloo backend, as `torchrun --nproc_per_node=2` starts them on GPUs.

The worker records the dataset indices each process trained on and saves its final parameters; the test
checks that both processes end with identical parameters (DDP averaged their gradients), that within each
epoch the two shards are disjoint and cover the epoch, that only rank 0 wrote the run directory, and that a
run stopped at max_steps and resumed into fresh models ends where an uninterrupted two-process run ends.
A shared-forward method (two phases from one forward, gradients averaged by `sync_grads` because DDP allows one
backward per forward) also ends with identical parameters on both processes.
(Resuming after a real crash is tested single-process in test_training.py; one torchrun launch keeps this fast.)
"""
import os
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    from equivariant_mi.data import ImageSet
    from equivariant_mi.methods.toy import ToyInfoNCE
    from equivariant_mi.method import Method, Phase
    from equivariant_mi.training import fit
    import torch.nn.functional as F

    class Recording(ToyInfoNCE):
        "The toy, remembering the dataset indices of every batch this process draws."
        def make_batch(self, data, idx, ctx):
            self.seen = getattr(self, 'seen', []) + [idx.clone()]
            return super().make_batch(data, idx, ctx)

    def run(out, init_seed, **kw):
        torch.manual_seed(init_seed)                    # different initial weights per process and per run
        m = Recording.from_preset('tiny')
        res = fit(m, data, epochs=2, out=out, batch_size=32, seed=3, device='cpu', checkpoint_every=3, log_every=2,
                  progress=False, **kw)
        torch.save({'params': m.state_dict(), 'seen': torch.stack(m.seen), 'step': res.step},
                   f"{out}/rank{dist.get_rank()}-{res.step}.pt")

    class SharedPair(Method):
        "DIM's shape: two phases from one forward (its gradients are averaged by sync_grads, not by DDP)."
        shared_forward = True
        def __init__(self, config=None, **kw):
            super().__init__(config, **kw)
            self.encoder, self.disc = torch.nn.Linear(784, 4), torch.nn.Linear(4, 1)
        def phases(self): return [Phase('encoder', 'encoder'), Phase('prior', 'disc', loss='d_loss')]
        def training_step(self, batch, ctx):
            z = torch.tanh(self.encoder(self.to_input(batch['x']).flatten(1)))
            fake, real = self.disc(z), self.disc(torch.rand_like(z))   # per-process draws: differ across ranks
            return {'loss': F.softplus(-fake).mean(), 'd_loss': F.softplus(-real).mean() + F.softplus(fake).mean()}

    def run_shared(out):
        torch.manual_seed(dist.get_rank())
        m = SharedPair()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        fit(m, data, epochs=1, batch_size=32, seed=3, device='cpu', progress=False)
        torch.save({'params': m.state_dict(), 'before': before}, f"{out}/shared-rank{dist.get_rank()}.pt")

    dist.init_process_group('gloo')                     # fit joins a group that exists (it would create one otherwise)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (256, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(256) % 10)
    root, rank = sys.argv[1], dist.get_rank()
    run(f'{root}/straight', rank)                                  # 2 epochs x 256 / (2 x 32) = 8 steps
    run(f'{root}/split', rank, max_steps=5)                        # same start; stops with a checkpoint after 5 steps
    run(f'{root}/split', 20 + rank, resume=True)                   # a fresh model resumes it to step 8
    run_shared(root)
    dist.destroy_process_group()
''')


def test_two_processes_identical_disjoint_shards_and_resume(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    out = tmp_path / 'straight'
    r0, r1 = torch.load(out / 'rank0-8.pt'), torch.load(out / 'rank1-8.pt')
    for k in r0['params']: assert torch.equal(r0['params'][k], r1['params'][k]), k
    s0, s1 = r0['seen'].view(2, -1), r1['seen'].view(2, -1)          # [epoch, indices of that epoch]
    for e in range(2):
        assert set(s0[e].tolist()).isdisjoint(s1[e].tolist())
        assert sorted(s0[e].tolist() + s1[e].tolist()) == list(range(256))
    assert not torch.equal(s0[0], s0[1]), 'each epoch has its own order'
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ck['world_size'] == 2 and len(ck['rng']) == 2 and ck['step'] == 8
    for k in r0['params']: assert torch.equal(ck['model'][k], r0['params'][k]), k
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint.prev.pt', 'checkpoint.pt', 'config.json',
                                                     'metrics.jsonl', 'rank0-8.pt', 'rank1-8.pt']

    split = tmp_path / 'split'
    assert torch.load(split / 'rank0-5.pt')['step'] == 5
    b0, b1 = torch.load(split / 'rank0-8.pt'), torch.load(split / 'rank1-8.pt')
    for k in r0['params']:
        assert torch.equal(b0['params'][k], r0['params'][k]) and torch.equal(b1['params'][k], r0['params'][k]), k
    assert torch.equal(b0['seen'].flatten(), r0['seen'].flatten()[5 * 32:]), 'the resumed run continues the same shard'

    s0, s1 = torch.load(tmp_path / 'shared-rank0.pt'), torch.load(tmp_path / 'shared-rank1.pt')
    for k in s0['params']:                                        # shared-forward phases: gradients averaged too
        assert torch.equal(s0['params'][k], s1['params'][k]), k
        assert not torch.equal(s0['params'][k], s0['before'][k]), k
