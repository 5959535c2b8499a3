"""The `emi` console script as a user runs it, in a subprocess: an error is one line on stderr with no traceback,
and a short real train + eval on MNIST works end to end.

Every error path, the NaN exit, resuming, `--from` and repeated evaluations are shown and checked in-process in
nbs/90_cli.ipynb; this file keeps only what needs a real process.
"""
import json
import subprocess
import sys
from pathlib import Path


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
