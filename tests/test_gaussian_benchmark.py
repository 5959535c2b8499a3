"""The correlated-Gaussian benchmark as a script: what a notebook cannot test is `python -m ...` itself
(the `__main__` guard, the relative package imports, the printed table and the JSON on disk)."""
import json
import math
import platform
import subprocess
import sys

import pytest


def test_cli_runs_as_a_module_and_writes_json(tmp_path):
    out = tmp_path / 'sub' / 'gaussian.json'
    cmd = [sys.executable, '-m', 'equivariant_mi.benchmarks.gaussian', '--steps', '3', '--levels', '2', '4',
           '--critics', 'separable', '--estimators', 'nwj', 'infonce', '--device', 'cpu', '--no-progress',
           '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'I = 4 nats' in r.stdout and 'steps/s' in r.stdout and 'wrote' in r.stdout, r.stdout
    d = json.loads(out.read_text())
    assert d['config']['levels'] == [2.0, 4.0] and d['config']['steps'] == 3
    assert d['shape'] == [6, 1, 2, 1]                       # [step, critic, estimator, replica], stored flat
    est = d['estimates']
    assert len(est) == 6 * 2 and all(v <= math.log(64) + 1e-4 for v in est[1::2])   # InfoNCE never above log B
    assert d['ba'] is None                                  # BA was not asked for
    assert {r['level'] for r in d['summary']} == {2.0, 4.0}


def test_cli_rejects_bad_arguments_with_a_named_error():
    cmd = [sys.executable, '-m', 'equivariant_mi.benchmarks.gaussian', '--levels', '-3', '--steps', '1',
           '--device', 'cpu', '--no-progress']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and '`levels`' in r.stderr, r.stderr


def test_cli_dtype_flag_is_reported_under_the_table(tmp_path):
    for flag in ('fp32', 'bf16'):
        cmd = [sys.executable, '-m', 'equivariant_mi.benchmarks.gaussian', '--steps', '2', '--levels', '2',
               '--critics', 'concat', '--dtype', flag, '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 'g.json')]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert f', {flag}, cuda_graph=False' in r.stdout, r.stdout
        assert json.loads((tmp_path / 'g.json').read_text())['info']['dtype'] == flag


@pytest.mark.skipif(not (platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'), reason='mallopt is glibc-only')
def test_cpu_runs_keep_freed_memory_on_glibc():
    """The CPU step re-allocates ~100 MB of activations every step; glibc must keep them rather than unmap them."""
    from equivariant_mi.benchmarks.gaussian import _keep_freed_memory
    assert _keep_freed_memory() is True


@pytest.mark.skipif(not __import__('torch').cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
def test_cuda_graph_step_matches_the_eager_step(dtype):
    """The stacked step captured as a CUDA graph (the default on a GPU) gives the eager step's estimates."""
    import numpy as np
    from equivariant_mi.benchmarks.gaussian import run_staircase
    kw = dict(levels=(2.0, 6.0), steps=6, device='cuda', dtype=dtype)
    graph = run_staircase(**kw)                                  # 3 eager warm-up steps, then replays across a level change
    eager = run_staircase(**kw, cuda_graph=False)
    assert graph.info['cuda_graph'] is True and eager.info['cuda_graph'] is False
    assert graph.info['dtype'] == dtype and np.isfinite(graph.estimates).all()
    np.testing.assert_allclose(graph.estimates, eager.estimates, rtol=1e-3, atol=1e-3 if dtype == 'fp32' else 5e-2)


def test_cli_trains_barber_agakov_alongside_the_critics(tmp_path):
    """BA (a learned Gaussian q(y|x), H(Y) known) is in the same batched run, the table and the JSON; at 1 nat it learns."""
    out = tmp_path / 'ba.json'
    cmd = [sys.executable, '-m', 'equivariant_mi.benchmarks.gaussian', '--steps', '300', '--levels', '1',
           '--critics', 'separable', '--estimators', 'infonce', 'ba', '--device', 'cpu', '--no-progress',
           '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'q(y|x)' in r.stdout and 'BA, Gaussian q' in r.stdout, r.stdout
    d = json.loads(out.read_text())
    assert d['shape'] == [300, 1, 1, 1] and len(d['ba']) == 300
    ba_row = [s for s in d['summary'] if s['estimator'] == 'ba']
    assert len(ba_row) == 1 and abs(ba_row[0]['bias']) < 0.5, ba_row   # mean of the last 150 steps near 1 nat
