"""VTE through the command line: stage 1, stage 2 built on it with --from or trained by the same command, emi eval with 5 draws."""
import json

import equivariant_mi.methods.vte  # noqa: F401  registers the five models (methods/__init__ may not import it yet)
from equivariant_mi import cli

SMALL = ['--preset', 'mnist', '--subset', '256', '--max-steps', '3', '--no-progress', '--set', 'small_widths=[8,16]',
         '--set', 'z_dim=16', '--set', 'decoder_hidden=32', '--set', 'concat_hidden=16']


def test_two_stages_through_the_cli(tmp_path, capsys):
    pt, ba = tmp_path / 'pt', tmp_path / 'ba'
    assert cli.main(['train', 'vte-pt', *SMALL, '--out', str(pt)]) == 0
    assert cli.main(['train', 'vte-ba', *SMALL, '--out', str(ba), '--from', str(pt)]) == 0
    info = json.loads((ba / 'config.json').read_text())
    assert info['requires']['stage1']['method'] == 'vte-pt' and info['requires']['stage1']['module'] == 'encoder'
    capsys.readouterr()
    assert cli.main(['eval', str(ba), '--labels', '50', '--samples', '5', '--test-subset', '200', '--no-pixels']) == 0
    ev = json.loads((ba / 'eval.json').read_text())
    assert ev['samples'] == 5 and ev['layers']['z']['test_draws'] == 5
    assert ev['layers']['z']['probes']['logreg']['50']['error']['n'] == 5      # one error per test draw, averaged


def test_one_command_trains_then_reuses_stage_one(tmp_path, capsys):
    "Without --from a stage-2 model trains its stage-1 run beside it (same options); the next one does not train it again."
    assert cli.main(['train', 'vte-ba', *SMALL, '--out', str(tmp_path / 'ba')]) == 0
    stage1 = tmp_path / 'vte-pt-mnist-mnist'
    info = json.loads((tmp_path / 'ba' / 'config.json').read_text())
    assert info['requires']['stage1']['path'] == str(stage1.resolve())
    assert json.loads((stage1 / 'config.json').read_text())['config']['z_dim'] == 16       # the --set settings too
    capsys.readouterr()
    before = (stage1 / 'checkpoint.pt').read_bytes()
    assert cli.main(['train', 'vte-infonce-sep', *SMALL, '--out', str(tmp_path / 'sep')]) == 0
    assert 'the vte-pt run' in capsys.readouterr().out and (stage1 / 'checkpoint.pt').read_bytes() == before


def test_stage_one_beside_with_other_settings_is_refused(tmp_path, capsys):
    other = [a if a != 'z_dim=16' else 'z_dim=8' for a in SMALL]
    assert cli.main(['train', 'vte-pt', *other, '--out', str(tmp_path / 'vte-pt-mnist-mnist')]) == 0
    capsys.readouterr()
    status = cli.main(['train', 'vte-infonce-sep', *SMALL, '--out', str(tmp_path / 'x')])
    err = capsys.readouterr().err
    assert status == 2 and 'z_dim' in err and '--from stage1=RUN' in err


def test_stage_one_must_match(tmp_path, capsys):
    pt = tmp_path / 'pt'
    assert cli.main(['train', 'vte-pt', *SMALL, '--out', str(pt)]) == 0
    capsys.readouterr()
    other = [a if a != 'z_dim=16' else 'z_dim=8' for a in SMALL]
    try: status = cli.main(['train', 'vte-ba', *other, '--out', str(tmp_path / 'ba'), '--from', str(pt)])
    except ValueError as e: status, err = 1, str(e)
    else: err = capsys.readouterr().err
    assert status != 0 and 'differs' in err


def test_resume_is_exact(tmp_path):
    "Stopped at step 7 and resumed, a run ends with the weights of an uninterrupted one (t comes from the step context)."
    import torch
    from equivariant_mi.data import load_dataset
    from equivariant_mi.method import build_method
    from equivariant_mi.training import fit
    data = load_dataset('mnist', 'train').subset(torch.arange(256))
    kw = dict(small_widths=(8, 16), z_dim=16, decoder_hidden=32, concat_hidden=16, batch_size=32)
    run = dict(epochs=2, progress=False, checkpoint_every=5, device='cpu')

    def build(name):
        torch.manual_seed(0)
        return build_method(name, 'mnist', **kw)
    fit(build('vte-pt'), data, out=tmp_path / 'pt', max_steps=2, **run)
    for name, fr in [('vte-pt', None), ('vte-ba', {'stage1': tmp_path / 'pt'})]:
        straight = fit(build(name), data, out=tmp_path / f'{name}-a', from_runs=fr, **run)
        fit(build(name), data, out=tmp_path / f'{name}-b', max_steps=7, from_runs=fr, **run)
        resumed = fit(build(name), data, out=tmp_path / f'{name}-b', resume=True, from_runs=fr, **run)
        assert straight.step == resumed.step == 16
        sa, sb = straight.method.state_dict(), resumed.method.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
