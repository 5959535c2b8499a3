"""What the training chapter cannot show: a real crash, and the GPU paths.

A run is killed for real (SIGKILL from inside training_step, in a subprocess: no exception handler, no finally
block, no flush) at step k; a fresh process resumes it into a freshly built method whose initial weights differ,
and it must end bitwise equal to a run that was never interrupted, with the same metric rows. Three methods cover
the state a checkpoint must hold: the toy (Adam, views drawn from the step's generator), two alternating phases
(Adam + AdamW, dropout, global-generator draws in make_batch) and a shared-forward pair on SGD with Nesterov momentum
and a cosine schedule after a warm-up, whose loss follows `ctx.progress`. The data are small random uint8 images:
these tests are about the trainer's state, not about learning. Everything else about `fit` is shown and checked in
nbs/07_training.ipynb.
"""
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from equivariant_mi.data import ImageSet
from equivariant_mi.method import Method, MethodConfig, Phase
from equivariant_mi.methods.toy import ToyInfoNCE
from equivariant_mi.runs import load_run, read_metrics
from equivariant_mi.training import fit


def images(n=192, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, name='random')


class KillMixin:
    "SIGKILL this process at call number `kill_at` of training_step (counted per process, like a real crash)."
    kill_at = None

    def _tick(self):
        self.calls = getattr(self, 'calls', 0) + 1
        if self.calls == self.kill_at: os.kill(os.getpid(), signal.SIGKILL)


class KillToy(KillMixin, ToyInfoNCE):
    def training_step(self, batch):
        self._tick()
        return super().training_step(batch)


class TwoPhase(KillMixin, Method):
    "Two alternating optimisers (Adam and AdamW), dropout and a per-batch random draw in make_batch."
    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 8))
        self.critic = nn.Linear(8, 1)

    def phases(self):
        return [Phase('encoder', 'encoder', every=2, offset=0),
                Phase('critic', 'critic', every=2, offset=1, optimizer='adamw', lr=3e-3, weight_decay=0.1)]

    def make_batch(self, data, idx, ctx):
        noise_idx = torch.randint(len(data), (len(idx),), device=idx.device)     # draws from the global generator
        return {'x': data.images[idx], 'x_other': data.images[noise_idx]}

    def training_step(self, batch, ctx):
        self._tick()
        z, z_other = self.encoder(self.to_input(batch['x'])), self.encoder(self.to_input(batch['x_other']))
        if ctx.phase == 'critic': z, z_other = z.detach(), z_other.detach()
        gap = self.critic(z).mean() - self.critic(z_other).mean()
        return {'loss': -gap if ctx.phase == 'critic' else gap + 0.01 * z.pow(2).mean(), 'gap': gap}


@dataclass
class SharedConfig(MethodConfig):
    optimizer: str = 'sgd'
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = 'cosine'
    warmup: float = 0.2


class SharedSGD(KillMixin, Method):
    "DIM's shape: encoder and prior discriminator from one forward; SGD, cosine schedule, a progress-weighted term."
    Config, shared_forward = SharedConfig, True

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4))
        self.disc = nn.Linear(4, 1)

    def phases(self):
        return [Phase('encoder', 'encoder'), Phase('prior', 'disc', loss='d_loss', when=lambda ctx: ctx.batch % 3 != 1)]

    def training_step(self, batch, ctx):
        self._tick()
        z = torch.tanh(self.encoder(self.to_input(batch['x'])))
        fake, real = self.disc(z), self.disc(torch.rand_like(z) * 2 - 1)
        return {'loss': F.softplus(-fake).mean() + ctx.progress * z.pow(2).mean(),
                'd_loss': F.softplus(-real).mean() + F.softplus(fake).mean()}


KINDS = {'toy': lambda: KillToy.from_preset('tiny'), 'two-phase': TwoPhase, 'shared-sgd': SharedSGD}
KW = dict(epochs=3, seed=5, batch_size=32, checkpoint_every=4, checkpoint_minutes=None, log_every=3, device='cpu',
          progress=False)                    # checkpoints only every 4 steps (not at epoch ends): the kill loses 3


def worker(kind, mode, out, kill_at=None):
    "Run in a subprocess: 'kill' trains until SIGKILL; 'finish' trains straight into out/a and resumes out/b."
    torch.manual_seed(0)
    m = KINDS[kind](); m.kill_at = int(kill_at) if kill_at is not None else None
    if mode == 'kill': fit(m, images(), out=Path(out) / 'b', **KW)
    else:
        fit(m, images(), out=Path(out) / 'a', **KW)
        torch.manual_seed(99)                                            # other initial weights
        fit(KINDS[kind](), images(), out=Path(out) / 'b', resume=True, **KW)


def run_worker(*args):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_training as t; t.worker(*sys.argv[1:])")
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize('kind', list(KINDS))
def test_sigkill_then_resume_equals_uninterrupted(kind, tmp_path):
    p = run_worker(kind, 'kill', tmp_path, 7)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ck = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)
    assert ck['step'] == 4                           # the last multiple of checkpoint_every before the kill
    p = run_worker(kind, 'finish', tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = torch.load(tmp_path / 'a' / 'checkpoint.pt', weights_only=True), \
        torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)
    assert a['step'] == b['step'] == 18
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    for name, opt in a['optimizers'].items():        # optimiser moments and step counters too
        for i, st in opt['state'].items():
            for k, v in st.items(): assert torch.equal(v, b['optimizers'][name]['state'][i][k]), (name, i, k)
    assert a['schedules'] == b['schedules']
    rows_a, rows_b = read_metrics(tmp_path / 'a'), read_metrics(tmp_path / 'b')
    assert [r['step'] for r in rows_b] == sorted({r['step'] for r in rows_b}) == [r['step'] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b): assert {k: v for k, v in ra.items() if k != 'time'} == \
        {k: v for k, v in rb.items() if k != 'time'}


# ---- on a GPU (skipped on CPU-only machines): the mixed-precision paths --------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
@pytest.mark.parametrize('precision', ['auto', 'bf16', 'fp16', 'fp32'])
def test_cuda_precisions_channels_last_and_checkpoint(precision, tmp_path):
    torch.manual_seed(0)
    m = ToyInfoNCE()
    before = m.encoder[0].weight.detach().clone()
    res = fit(m, images(1024), epochs=3, batch_size=128, out=tmp_path, device='cuda', precision=precision,
              progress=False, log_every=4, checkpoint_every=10)
    assert all(math.isfinite(v) for r in res.history for v in r.values()), res.history
    assert not torch.equal(before, m.encoder[0].weight.detach().cpu()), 'the optimiser must have stepped'
    conv = res.method.encoder[0].weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    info = json.loads((tmp_path / 'config.json').read_text())['fit']
    expected = {'bf16': 'bfloat16', 'fp16': 'float16', 'fp32': 'float32'}.get(precision)
    if expected: assert info['precision'] == expected
    assert info['grad_scaler'] == (info['precision'] == 'float16')
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    if info['grad_scaler']: assert ck['scalers']['main']['scale'] > 0
    back = load_run(tmp_path, device='cuda')
    assert torch.isfinite(back.encode(images(8).images.cuda())).all()


@cuda
@pytest.mark.parametrize('kind', list(KINDS))
def test_cuda_resume_matches(kind, tmp_path):
    kw = {**KW, 'device': 'cuda'}
    torch.manual_seed(0); straight = fit(KINDS[kind](), images(), out=tmp_path / 'a', **kw)
    torch.manual_seed(0); fit(KINDS[kind](), images(), out=tmp_path / 'b', max_steps=7, **kw)
    torch.manual_seed(9); resumed = fit(KINDS[kind](), images(), out=tmp_path / 'b', resume=True, **kw)
    for (k, a), b in zip(straight.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), k        # cuDNN kernels need not be bitwise deterministic


@cuda
def test_cuda_compile(tmp_path):
    torch.manual_seed(0)
    res = fit(ToyInfoNCE(), images(1024), epochs=2, batch_size=128, device='cuda', compile=True, progress=False,
              log_every=4)
    assert res.step == 16 and all(math.isfinite(r['loss']) for r in res.history)
