"""The `emi` console script as a user runs it, in a subprocess: an error is one line on stderr with no traceback, a
short real train + eval on MNIST works end to end, and a run survives the ways runs really end.

A run is ended for real at a random step, in its own process: SIGKILL (nothing runs after it: no handler, no finally
block, no flush), including a kill before the first checkpoint, and SIGINT / SIGTERM (Ctrl-C, a pre-emption), which
must end it cleanly with a checkpoint of the step and exit 128 + signal. Then `emi train --out DIR --resume`, with no
other option, must end with the weights of a run that was never interrupted (bitwise, on the CPU) and the same metric
rows, none missing and none twice. Every error path, eval.json provenance and the damaged-folder cases are shown and
checked in-process in nbs/90_cli.ipynb; this file keeps only what needs a real process.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


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


# ---- runs ended for real -----------------------------------------------------------------------------------------
# 384 MNIST digits, batch 32: 12 steps an epoch, 36 in all; default checkpoints at the epoch ends (steps 12, 24, 36)
RUN = ['train', 'toy', '--preset', 'tiny', '--subset', '384', '--batch-size', '32', '--epochs', '3', '--seed', '3',
       '--log-every', '5', '--device', 'cpu', '--no-progress']
STEPS, FIRST_CHECKPOINT = 36, 12

# the real CLI in a process that sends itself `sig` during training step number `at` (counted from 1)
SIGNALLER = textwrap.dedent('''
    import os, sys
    from equivariant_mi.methods.toy import ToyInfoNCE
    from equivariant_mi.cli import main
    sig, at = int(sys.argv[1]), int(sys.argv[2])
    step = ToyInfoNCE.training_step
    def training_step(self, batch):
        self.calls = getattr(self, 'calls', 0) + 1
        if self.calls == at: os.kill(os.getpid(), sig)
        return step(self, batch)
    ToyInfoNCE.training_step = training_step
    sys.exit(main(sys.argv[3:]))
''')


def emi_signalled(sig, at, *argv):
    return subprocess.run([sys.executable, '-c', SIGNALLER, str(int(sig)), str(at), *map(str, argv)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    "The run that was never interrupted."
    out = tmp_path_factory.mktemp('straight') / 'run'
    p = emi(*RUN, '--out', out)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def assert_same_run(a, b, why):
    ck_a, ck_b = (torch.load(d / 'checkpoint.pt', weights_only=True) for d in (a, b))
    assert ck_a['step'] == ck_b['step'] == STEPS, why
    for k in ck_a['model']: assert torch.equal(ck_a['model'][k], ck_b['model'][k]), (why, k)
    rows = [[{k: v for k, v in r.items() if k != 'time'} for r in map(json.loads, (d / 'metrics.jsonl').open())]
            for d in (a, b)]
    assert rows[0] == rows[1], (why, [r['step'] for r in rows[0]], [r['step'] for r in rows[1]])
    info_a, info_b = (json.loads((d / 'config.json').read_text()) for d in (a, b))
    assert {k: v for k, v in info_a.items() if k not in ('meta', 'resumed')} == \
        {k: v for k, v in info_b.items() if k not in ('meta', 'resumed')}, why      # settings never rewritten


@pytest.mark.parametrize('when', ['before the first checkpoint', 'at a random step'])
def test_sigkill_then_resume_with_only_out(when, straight, tmp_path):
    at = 5 if when.startswith('before') else random.randint(FIRST_CHECKPOINT + 1, STEPS - 1)
    why = f'SIGKILL during step {at}'
    out = tmp_path / 'run'
    p = emi_signalled(signal.SIGKILL, at, *RUN, '--out', out)
    assert p.returncode == -signal.SIGKILL, (why, p.stderr[-2000:])
    assert (out / 'checkpoint.pt').exists() == (at > FIRST_CHECKPOINT), why
    p = emi('train', '--out', out, '--resume')
    assert p.returncode == 0, (why, p.stderr[-2000:])
    expected = 'restarting its run from step 0' if at <= FIRST_CHECKPOINT else 'from its checkpoint at step 12'
    assert expected in p.stdout, (why, p.stdout)
    assert_same_run(straight, out, why)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_signal_stops_cleanly_and_resumes(sig, straight, tmp_path):
    at = random.randint(1, STEPS - 1)
    why = f'{sig.name} during step {at}'
    out = tmp_path / 'run'
    p = emi_signalled(sig, at, *RUN, '--out', out)
    assert p.returncode == 128 + sig, (why, p.returncode, p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and f'{sig.name} at step {at}: stopped cleanly' in err[0] and '--resume' in err[0], (why, err)
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['step'] == at, why   # the step was finished, saved
    if sig == signal.SIGINT:                    # an unfinished run can be evaluated, and says what it is
        p = emi('eval', out, '--probe', 'knn', '--labels', '100', '--test-subset', '200', '--no-pixels')
        assert p.returncode == 0 and f'unfinished: evaluating its last checkpoint (step {at})' in p.stdout, \
            (why, p.stdout, p.stderr[-2000:])
        assert json.loads((out / 'eval.json').read_text())['checkpoint']['step'] == at
    p = emi('train', '--out', out, '--resume')
    assert p.returncode == 0, (why, p.stderr[-2000:])
    assert_same_run(straight, out, why)
