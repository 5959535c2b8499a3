"""EquiVAE outside its chapter: the `emi` command line trains, resumes and evaluates a semi-supervised preset,
and the SVHN preset (Gaussian likelihood, per-pixel standardisation) trains through `fit` on images of SVHN's shape.

SVHN cannot be downloaded here, so the SVHN test uses random 3x32x32 images: it checks the code path, not the data.
"""
import functools
import json

import pytest
import torch

import equivariant_mi.methods.equivae  # noqa: F401  (registers 'equivae' until methods/__init__ imports it)
from equivariant_mi import cli
from equivariant_mi import data as D
from equivariant_mi.data import ImageSet
from equivariant_mi.methods.equivae import EquiVAE
from equivariant_mi.training import fit

_load = functools.lru_cache(maxsize=None)(D.load_dataset)


@pytest.fixture(autouse=True)
def cached_mnist(monkeypatch):
    "Read each split once per test session instead of once per call."
    monkeypatch.setattr(cli.D, 'load_dataset', lambda name, split='train', root=None, **kw: _load(name, split, root))


def test_cli_semi_supervised_train_resume_eval(tmp_path, capsys):
    out = str(tmp_path / 'semi')
    base = ['train', 'equivae', '--preset', 'mnist-semi-100', '--subset', '600', '--set', 'val_size=100', '--device',
            'cpu', '--no-progress', '--out', out]             # 600 images: hold out 100, not the preset's 5 000
    assert cli.main(base + ['--max-steps', '2']) == 0
    assert cli.main(['train', 'equivae', '--out', out, '--resume', '--max-steps', '4', '--no-progress']) == 0
    info = json.loads((tmp_path / 'semi' / 'config.json').read_text())
    assert info['config']['label_budget'] == 100 and info['config']['latent_dim'] == 8
    assert info['n_items'] == 500                               # the first 100 of the subset held out (val_size)
    rows = [json.loads(l) for l in (tmp_path / 'semi' / 'metrics.jsonl').read_text().splitlines()]
    assert rows and all(r['step'] <= 4 for r in rows)
    assert cli.main(['eval', out, '--probe', 'centroid', '--labels', '100', '--test-subset', '200', '--no-pixels',
                     '--device', 'cpu']) == 0
    text = capsys.readouterr().out
    for layer in ('f_inv', 'v', 'log_qy'): assert layer in text


def test_cli_label_budget_larger_than_data(capsys):
    status = cli.main(['train', 'equivae', '--preset', 'mnist-semi-3000', '--subset', '600', '--set', 'val_size=100',
                       '--device', 'cpu', '--no-progress', '--max-steps', '1'])
    err = capsys.readouterr().err
    assert status == 2 and 'label_budget' in err, err


def test_svhn_preset_trains_on_svhn_shaped_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, 1] = images[:, 1] // 4 + 100                      # a channel with another mean and spread
    ds = ImageSet(images, torch.arange(96) % 10, 'svhn-shaped')
    torch.manual_seed(0)
    m = EquiVAE.from_preset('svhn', val_size=None)               # 96 images: none held out (the preset holds 3 257)
    res = fit(m, ds, epochs=1, max_steps=2, progress=False, log_every=1, device='cpu')
    assert res.step == 2 and all(torch.isfinite(torch.tensor(r['loss'])) for r in res.history)
    x = images.float() / 255
    torch.testing.assert_close(m.pixel_mean, x.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(m.pixel_std, x.std(0, unbiased=False), atol=1e-4, rtol=0)
    z = m.prepare(images)                                       # standardised: mean 0, std 1 per pixel
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-3
    with torch.no_grad():
        f = m.features(images[:4])
        out = m.decode(f['f_inv'], f['v'])
    assert out.shape == (4, 3, 32, 32)
    assert set(f) == {'f_inv', 'v'} and f['f_inv'].shape == (4, 16)
