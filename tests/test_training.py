"""Reliability tests of equivariant_mi.training.fit beyond the chapter's demonstrations.

Interruptions are real: the method raises from inside training_step at step k (as a pre-empted job
would die), or fit stops at max_steps; the run is then resumed into a freshly built method whose
initial weights differ, and must end bitwise equal to a run that was never interrupted. The data
are small random uint8 images: these tests are about the trainer's state, not about learning.
"""
import json
import math

import pytest
import torch
from torch import nn

from equivariant_mi.data import ImageSet
from equivariant_mi.method import Method, MethodConfig, Phase, register, METHODS
from equivariant_mi.methods.toy import ToyInfoNCE
from equivariant_mi.runs import load_run, read_metrics
from equivariant_mi.training import NonFiniteLossError, fit


def images(n=192, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, name='random')


class Crash(Exception):
    pass


class CrashMixin:
    "Raise Crash at call number `crash_at` of training_step (counted per process, like a real crash)."
    crash_at = None

    def _tick(self):
        self.calls = getattr(self, 'calls', 0) + 1
        if self.calls == self.crash_at: raise Crash(f'crash at step {self.calls}')


class CrashToy(CrashMixin, ToyInfoNCE):
    "The toy: random views from the global generator, Adam on every parameter."
    def training_step(self, batch):
        self._tick()
        return super().training_step(batch)


class TwoPhase(CrashMixin, Method):
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


def build(kind, seed):
    torch.manual_seed(seed)
    return CrashToy.from_preset('tiny') if kind == 'toy' else TwoPhase()


KW = dict(epochs=3, seed=5, batch_size=32, checkpoint_every=4, log_every=3, device='cpu', progress=False)


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa: assert torch.equal(sa[k], sb[k]), f'{k} differs'


@pytest.mark.parametrize('kind', ['toy', 'two-phase'])
@pytest.mark.parametrize('crash_at', [7, 6])   # 6 = the last step of epoch 0 (6 batches of 32 per epoch)
def test_resume_after_crash_equals_uninterrupted(kind, crash_at, tmp_path):
    data = images()
    straight = fit(build(kind, 0), data, out=tmp_path / 'a', **KW)
    m = build(kind, 0); m.crash_at = crash_at
    with pytest.raises(Crash, match=f'crash at step {crash_at}'):
        fit(m, data, out=tmp_path / 'b', **KW)
    ck = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)
    assert ck['step'] == 4                            # the last multiple of checkpoint_every before the crash
    resumed = fit(build(kind, 99), data, out=tmp_path / 'b', resume=True, **KW)
    assert resumed.step == straight.step == 18 and resumed.completed
    assert_same_params(straight.method, resumed.method)
    for name, opt in straight.optimizers.items():     # Adam moments and step counters too
        sa, sb = opt.state_dict()['state'], resumed.optimizers[name].state_dict()['state']
        for i in sa:
            for k in sa[i]: assert torch.equal(sa[i][k], sb[i][k]), (name, i, k)
    steps = [r['step'] for r in read_metrics(tmp_path / 'b')]
    assert steps == sorted(set(steps)) == [r['step'] for r in read_metrics(tmp_path / 'a')]
    assert [r['step'] for r in straight.history] == steps


def test_max_steps_then_resume_with_more_epochs(tmp_path):
    data = images()
    straight = fit(build('toy', 0), data, out=tmp_path / 'a', **{**KW, 'epochs': 4})
    part = fit(build('toy', 0), data, out=tmp_path / 'b', max_steps=9, **KW)
    assert part.step == 9 and not part.completed
    assert torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['step'] == 9
    more = fit(build('toy', 3), data, out=tmp_path / 'b', resume=True, **{**KW, 'epochs': 4})  # 3 epochs asked first, now 4
    assert more.step == 24
    assert_same_params(straight.method, more.method)


def test_resume_refuses_other_settings_and_overwrite_needs_a_flag(tmp_path):
    data = images()
    fit(build('toy', 0), data, out=tmp_path, max_steps=2, **KW)
    with pytest.raises(ValueError, match=r"cannot resume .* differs in \['config'\]"):
        fit(CrashToy.from_preset('default'), data, out=tmp_path, resume=True, **KW)
    with pytest.raises(ValueError, match=r"differs in \['seed'\]"):
        fit(build('toy', 0), data, out=tmp_path, resume=True, **{**KW, 'seed': 6})
    with pytest.raises(ValueError, match='already holds a run'):
        fit(build('toy', 0), data, out=tmp_path, **KW)
    assert fit(build('toy', 0), data, out=tmp_path, overwrite=True, max_steps=1, **KW).step == 1


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    res = fit(build('toy', 0), images(), out=tmp_path / 'new', resume=True, max_steps=3, **KW)
    assert res.step == 3 and (tmp_path / 'new' / 'checkpoint.pt').exists()


class NaNLater(ToyInfoNCE):
    "The toy plus a logged term 'kl' that becomes NaN from call `nan_at` on."
    name = 'test-nan'
    nan_at = 10

    def training_step(self, batch):
        self.calls = getattr(self, 'calls', 0) + 1
        out = super().training_step(batch)
        kl = out['loss'] * 0 + (float('nan') if self.calls >= self.nan_at else 0.0)
        return {'loss': out['loss'] + kl, 'kl': kl}


@pytest.mark.parametrize('nan_at', [10, 3])
def test_nan_stops_naming_step_and_term_keeping_last_good_checkpoint(nan_at, tmp_path):
    register(NaNLater)
    try:
        torch.manual_seed(0)
        m = NaNLater.from_preset('tiny'); m.nan_at = nan_at
        with pytest.raises(NonFiniteLossError) as err:
            fit(m, images(), out=tmp_path, **{**KW, 'log_every': 5})
        msg = str(err.value)
        assert f'at step {nan_at}:' in msg and "'kl'=nan" in msg, msg
        ck_path = tmp_path / 'checkpoint.pt'
        if nan_at == 3:                                              # no checkpoint was due before step 3
            assert 'no checkpoint had been written yet' in msg and not ck_path.exists()
            return
        ck = torch.load(ck_path, weights_only=True)
        assert ck['step'] == 8 and '(step 8)' in msg
        assert all(torch.isfinite(v).all() for v in ck['model'].values())
        back = load_run(tmp_path, device='cpu')                        # the kept checkpoint loads as a run
        assert isinstance(back, NaNLater) and torch.isfinite(back.encode(images(4).images)).all()
    finally:
        METHODS.pop('test-nan', None)


def test_load_run_rebuilds_the_trained_method(tmp_path):
    res = fit(build('toy', 0), images(), out=tmp_path, max_steps=4, **KW)
    info = json.loads((tmp_path / 'config.json').read_text())
    assert info['method'] == 'toy' and info['preset'] == 'tiny' and info['fit']['seed'] == 5 and info['fit']['precision'] == 'float32'
    x = images(8, seed=1).images
    back = load_run(tmp_path, device='cpu')
    assert type(back) is ToyInfoNCE and not back.training and back.preset == 'tiny'
    with torch.no_grad():
        for k, v in res.method.eval().features(x).items(): assert torch.equal(v, back.features(x)[k]), k


def test_bad_arguments_are_named(tmp_path):
    data = images()
    with pytest.raises(ValueError, match=r'`batch_size` must be >= 2 for method'):
        fit(build('toy', 0), data, batch_size=1, device='cpu', progress=False)
    with pytest.raises(ValueError, match='`precision`'):
        fit(build('toy', 0), data, precision='fp8', device='cpu', progress=False)
    with pytest.raises(ValueError, match='`epochs` must be a positive int'):
        fit(build('toy', 0), data, epochs=0, device='cpu', progress=False)
    with pytest.raises(ValueError, match='larger than the'):
        fit(build('toy', 0), images(20), batch_size=32, device='cpu', progress=False)
    with pytest.raises(TypeError, match='`data` must be an ImageSet'):
        fit(build('toy', 0), torch.zeros(4, 1, 28, 28), device='cpu')
    with pytest.raises(ValueError, match='takes images of shape'):
        fit(build('toy', 0), images(size=32), device='cpu', progress=False)
    with pytest.raises(ValueError, match='does not exist'):
        load_run(tmp_path / 'missing')


class NoLoss(Method):
    def __init__(self, **kw):
        super().__init__(**kw); self.f = nn.Linear(784, 2)

    def training_step(self, batch):
        return {'objective': self.f(self.to_input(batch['x']).flatten(1)).mean()}


def test_training_step_must_return_the_phase_loss():
    with pytest.raises(TypeError, match=r"must return a dict with the key 'loss'.*got \['objective'\]"):
        fit(NoLoss(batch_size=16), images(), epochs=1, device='cpu', progress=False)


def test_frozen_module_is_left_out_and_stays_in_eval_mode(tmp_path):
    class Student(Method):
        frozen = ('teacher',)

        def __init__(self, **kw):
            super().__init__(**kw)
            self.teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 4), nn.Dropout(0.5))
            self.student = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))

        def training_step(self, batch):
            assert not self.teacher.training
            x = self.to_input(batch['x'])
            return {'loss': (self.student(x) - self.teacher(x)).pow(2).mean()}

    torch.manual_seed(0)
    m = Student(batch_size=32)
    before = [p.clone() for p in m.teacher.parameters()]
    res = fit(m, images(), epochs=2, device='cpu', progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, m.teacher.parameters()))
    assert len(res.optimizers['main'].param_groups[0]['params']) == 2


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
def test_cuda_resume_after_crash_matches(tmp_path):
    kw = {**KW, 'device': 'cuda'}
    data = images()
    straight = fit(build('toy', 0), data, out=tmp_path / 'a', **kw)
    m = build('toy', 0); m.crash_at = 7
    with pytest.raises(Crash): fit(m, data, out=tmp_path / 'b', **kw)
    resumed = fit(build('toy', 9), data, out=tmp_path / 'b', resume=True, **kw)
    for (k, a), b in zip(straight.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), k        # cuDNN kernels need not be bitwise deterministic


@cuda
def test_cuda_compile(tmp_path):
    torch.manual_seed(0)
    res = fit(ToyInfoNCE(), images(1024), epochs=2, batch_size=128, device='cuda', compile=True, progress=False, log_every=4)
    assert res.step == 16 and all(math.isfinite(r['loss']) for r in res.history)
