"""The `emi` command line: every error path gives one line on stderr naming the argument, and exit status 2;
a short real train + eval on MNIST works end to end through the installed console script.

Most tests call `main(argv)` in-process (MNIST is read once and cached for the module); the end-to-end test
and one error test run the real `emi` executable in a subprocess, so they also prove that no traceback leaks.
"""
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equivariant_mi import cli
from equivariant_mi import data as D
from equivariant_mi.method import METHODS, Requirement, register
from equivariant_mi.methods.toy import ToyInfoNCE

_load = functools.lru_cache(maxsize=None)(D.load_dataset)


@pytest.fixture(autouse=True)
def cached_mnist(monkeypatch):
    "Read each split once per test session instead of once per call."
    monkeypatch.setattr(cli.D, 'load_dataset', lambda name, split='train', root=None, **kw: _load(name, split, root))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    "A tiny trained toy run (two steps on 256 MNIST digits)."
    out = tmp_path_factory.mktemp('runs') / 'toy'
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.D, 'load_dataset', lambda name, split='train', root=None, **kw: _load(name, split, root))
        assert cli.main(['train', 'toy', '--preset', 'tiny', '--subset', '256', '--batch-size', '64', '--max-steps', '2',
                         '--out', str(out), '--device', 'cpu', '--no-progress']) == 0
    return out


def fails(capsys, argv, *needles):
    "main(argv) must return 2 and print exactly one line on stderr containing every needle."
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, (argv, status, err)
    assert err.count('\n') == 1 and err.startswith('emi: error: '), err
    for n in needles: assert n in err, (n, err)
    return err


# ---- emi train ------------------------------------------------------------------------------------------------
def test_unknown_method(capsys): fails(capsys, ['train', 'tyo'], 'argument METHOD', "'tyo'", "'toy'")
def test_unknown_preset(capsys): fails(capsys, ['train', 'toy', '--preset', 'big'], 'argument --preset', "['default', 'tiny']")
def test_unknown_dataset(capsys): fails(capsys, ['train', 'toy', '--dataset', 'imagenet'], 'argument --dataset', "'cifar10'")
def test_unknown_split(capsys): fails(capsys, ['train', 'toy', '--split', 'valid'], 'argument --split', "['train', 'test']")
def test_unknown_setting(capsys): fails(capsys, ['train', 'toy', '--set', 'temprature=0.1'], 'argument --set', "'temperature'")
def test_setting_without_value(capsys): fails(capsys, ['train', 'toy', '--set', 'lr'], 'argument --set', 'KEY=VALUE')
def test_impossible_setting(capsys): fails(capsys, ['train', 'toy', '--set', 'lr=-1'], 'argument --set', '`lr` must be a number in (0')
def test_unknown_precision(capsys): fails(capsys, ['train', 'toy', '--precision', 'fp8'], 'argument --precision', "'bf16'")
def test_epochs_not_positive(capsys): fails(capsys, ['train', 'toy', '--epochs', '0'], 'argument --epochs', 'positive integer')
def test_epochs_not_a_number(capsys): fails(capsys, ['train', 'toy', '--epochs', 'ten'], 'argument --epochs', "'ten'")
def test_max_steps_not_positive(capsys): fails(capsys, ['train', 'toy', '--max-steps', '-3'], 'argument --max-steps')
def test_unknown_device(capsys): fails(capsys, ['train', 'toy', '--device', 'tpu'], 'argument --device')
def test_missing_method(capsys): fails(capsys, ['train'], 'METHOD')
def test_unknown_command(capsys): fails(capsys, ['fit', 'toy'], "invalid choice: 'fit'")


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a GPU')
def test_cuda_without_gpu(capsys): fails(capsys, ['train', 'toy', '--device', 'cuda'], 'argument --device', 'no CUDA GPU')


def test_batch_size_below_contrastive_minimum(capsys):
    fails(capsys, ['train', 'toy', '--batch-size', '1'], 'argument --batch-size', 'must be >= 2', 'negatives')


def test_batch_size_larger_than_data(capsys):
    fails(capsys, ['train', 'toy', '--subset', '100', '--batch-size', '128'], 'argument --batch-size', 'larger than the 100 items')


def test_subset_larger_than_data(capsys):
    fails(capsys, ['train', 'toy', '--subset', '70000'], 'argument --subset', 'must be <= 60000')


def test_image_size_the_encoder_cannot_take(capsys):
    fails(capsys, ['train', 'toy', '--set', 'image_size=32'], 'argument --dataset', 'takes images of shape [N, 1, 32, 32]',
          '[60000, 1, 28, 28]')


def test_out_holding_a_run_needs_resume_or_overwrite(capsys, run_dir):
    fails(capsys, ['train', 'toy', '--preset', 'tiny', '--out', run_dir], 'argument --out', '--resume', '--overwrite')


def test_resume_with_another_method(capsys, run_dir):
    fails(capsys, ['train', 'other', '--out', run_dir, '--resume'], 'argument METHOD', "trained 'toy'")


def test_nan_loss_exits_1_with_one_line(capsys, tmp_path):
    @register
    class NaNToy(ToyInfoNCE):
        name = 'test-cli-nan'
        def training_step(self, batch): return {'loss': super().training_step(batch)['loss'] * float('nan')}
    try:
        status = cli.main(['train', 'test-cli-nan', '--preset', 'tiny', '--subset', '128', '--batch-size', '32',
                           '--out', str(tmp_path), '--device', 'cpu', '--no-progress', '--log-every', '2'])
        err = capsys.readouterr().err
        assert status == 1 and err.count('\n') == 1 and 'non-finite loss at step 1:' in err, err
    finally:
        METHODS.pop('test-cli-nan', None)


def test_resume_continues_from_the_run_config(capsys, tmp_path):
    out = tmp_path / 'r'
    base = ['--subset', '256', '--batch-size', '64', '--device', 'cpu', '--no-progress', '--out', out]
    assert cli.main(['train', 'toy', '--preset', 'tiny', '--seed', '4', '--epochs', '1', '--max-steps', '3',
                     *map(str, base)]) == 0
    # an option that contradicts the run is refused ...
    fails(capsys, ['train', 'toy', '--resume', '--out', out, '--seed', '5'], 'argument --seed', 'started with seed=4')
    fails(capsys, ['train', 'toy', '--resume', '--out', out, '--set', 'lr=0.1'], 'argument --set', 'lr=0.002')
    # ... and a relaunch with only --out and --resume takes settings, seed, subset and epochs from config.json
    assert cli.main(['train', 'toy', '--resume', '--out', str(out), '--device', 'cpu', '--no-progress']) == 0
    assert 'finished' in capsys.readouterr().out
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ck['step'] == 4 and ck['seed'] == 4 and ck['preset'] == 'tiny'          # 1 epoch of 256 / 64


class _Student(ToyInfoNCE):
    "A second stage: the toy, plus the frozen encoder of a finished toy run as `teacher` (logged, not trained)."
    name = 'test-cli-student'
    requires = {'teacher': Requirement(method='toy', module='encoder')}

    def training_step(self, batch):
        out = super().training_step(batch)
        with torch.no_grad(): z = self.teacher(self.to_input(batch['views']))
        return {**out, 'teacher_norm': z.norm(dim=1).mean()}


def test_from_run_copies_the_frozen_module_and_survives_its_deletion(capsys, run_dir, tmp_path):
    register(_Student)
    try:
        first, out = tmp_path / 'first', tmp_path / 'second'
        shutil.copytree(run_dir, first)
        base = ['train', 'test-cli-student', '--preset', 'tiny', '--subset', '256', '--batch-size', '64', '--device',
                'cpu', '--no-progress', '--out', str(out)]
        fails(capsys, base, 'argument --from', "'teacher'")                        # the requirement is named
        assert cli.main([*base, '--max-steps', '2', '--from', str(first)]) == 0
        info = json.loads((out / 'config.json').read_text())
        assert info['requires']['teacher']['path'] == str(first.resolve())
        shutil.rmtree(first)                                                       # the first run is gone ...
        back = cli.R.load_run(out, device='cpu')                                   # ... the second still loads
        taught = cli.R.load_checkpoint(run_dir / 'checkpoint.pt')['model']
        assert all(torch.equal(v, back.teacher.state_dict()[k.removeprefix('encoder.')])
                   for k, v in taught.items() if k.startswith('encoder.'))
        assert cli.main(['train', 'test-cli-student', '--resume', '--out', str(out), '--device', 'cpu',
                         '--no-progress']) == 0                                     # ... and resumes without --from
        assert torch.load(out / 'checkpoint.pt', weights_only=True)['step'] == 8      # 2 epochs of 256 / 64
    finally:
        METHODS.pop('test-cli-student', None)


# ---- emi eval -------------------------------------------------------------------------------------------------
def test_eval_missing_run_dir(capsys, tmp_path):
    fails(capsys, ['eval', tmp_path / 'nope'], 'argument DIR', 'does not exist')


def test_eval_dir_without_run(capsys, tmp_path):
    fails(capsys, ['eval', tmp_path], 'argument DIR', 'config.json and checkpoint.pt')


def test_eval_unknown_probe(capsys, run_dir):
    fails(capsys, ['eval', run_dir, '--probe', 'logreg,forest'], 'argument --probe', "['forest']", "'knn'")


def test_eval_label_budget_larger_than_data(capsys, run_dir):
    fails(capsys, ['eval', run_dir, '--labels', '50000,70000'], 'argument --labels', '[70000]', '60000 labelled')


def test_eval_labels_not_integers(capsys, run_dir):
    fails(capsys, ['eval', run_dir, '--labels', '5k'], 'argument --labels', "'5k'")


def test_eval_test_subset_too_large(capsys, run_dir):
    fails(capsys, ['eval', run_dir, '--test-subset', '20000'], 'argument --test-subset', '<= 10000')


def test_eval_unregistered_method(capsys, run_dir, tmp_path):
    other = tmp_path / 'run'
    shutil.copytree(run_dir, other)
    info = json.loads((other / 'config.json').read_text()); info['method'] = 'gone'
    (other / 'config.json').write_text(json.dumps(info))
    fails(capsys, ['eval', other], 'argument DIR', "'gone' is not registered")


def test_eval_stochastic_samples_and_no_pixels(capsys, run_dir):
    argv = ['eval', run_dir, '--probe', 'knn,centroid', '--labels', '100,50', '--seeds', '2', '--samples', '2',
            '--test-subset', '200', '--no-pixels', '--device', 'cpu']
    assert cli.main([str(a) for a in argv]) == 0
    ev = json.loads((run_dir / 'eval.json').read_text())
    assert set(ev['layers']) == {'f', 'h'} and ev['samples'] == 2 and ev['layers']['f']['seeds'] == [0, 1]
    r = ev['layers']['f']
    assert r['test_draws'] == 2 and r['probes']['knn']['100']['accuracy']['n'] == 4      # 2 seeds x 2 test draws
    assert 'knn@100' in capsys.readouterr().out
    # a second evaluation on the same test set adds its probe to eval.json instead of replacing the file
    assert cli.main([str(a) for a in argv[:2]] + ['--probe', 'logreg', '--labels', '100', '--samples', '2',
                                                 '--test-subset', '200', '--no-pixels', '--device', 'cpu']) == 0
    probes = json.loads((run_dir / 'eval.json').read_text())['layers']['f']['probes']
    assert set(probes) == {'knn', 'centroid', 'logreg'} and set(probes['knn']) == {'100', '50'}


def test_list(capsys):
    assert cli.main(['list']) == 0
    out = capsys.readouterr().out
    assert 'toy' in out and 'tiny' in out and 'mnist' in out and 'logreg' in out


# ---- the real console script ------------------------------------------------------------------------------------
def emi(*argv):
    exe = Path(sys.executable).with_name('emi')
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'equivariant_mi.cli']
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, timeout=600)


def test_console_script_error_is_one_line_without_traceback():
    p = emi('train', 'toy', '--batch-size', '1')
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr, p.stderr


def test_short_real_train_and_eval_end_to_end(tmp_path):
    out = tmp_path / 'toy'
    p = emi('train', 'toy', '--subset', '2048', '--epochs', '1', '--out', out, '--device', 'cpu', '--no-progress')
    assert p.returncode == 0, p.stderr[-2000:]
    assert {'config.json', 'metrics.jsonl', 'checkpoint.pt'} <= {f.name for f in out.iterdir()}
    p = emi('eval', out, '--probe', 'logreg,knn', '--labels', '1000', '--test-subset', '1000', '--device', 'cpu')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'pixels' in p.stdout and 'logreg@1000' in p.stdout, p.stdout
    ev = json.loads((out / 'eval.json').read_text())
    assert set(ev['layers']) == {'pixels', 'f', 'h'} and ev['n_test'] == 1000
    for feats in ev['layers'].values():
        for probe in ('logreg', 'knn'):
            assert 0.5 < feats['probes'][probe]['1000']['accuracy']['mean'] <= 1.0      # ten classes: chance is 0.1
