"""CRL-TAC beyond its chapter: a run interrupted by max_steps and resumed ends bitwise equal to one that was not
(both phases, the crop sampling, the P warm-up rule), and load_run rebuilds the trained model with its read-out.
Placed-MNIST-shaped random canvases: these tests are about the method's state, not about learning."""
import torch

from equivariant_mi.data import ImageSet
from equivariant_mi.methods.crl_tac import CRLTAC
from equivariant_mi.runs import load_run
from equivariant_mi.training import fit


def canvases(n=32, seed=0):
    "Blank 84x84 canvases with a random 28x28 patch in one of the 9 cells (meta['cell'] as placed-MNIST has it)."
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 84, 84, dtype=torch.uint8)
    cell = torch.randint(9, (n,), generator=g)
    for i in range(n):
        r, c = int(cell[i]) // 3 * 28, int(cell[i]) % 3 * 28
        x[i, :, r:r + 28, c:c + 28] = torch.randint(0, 256, (1, 28, 28), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, name='placed-random', meta={'cell': cell})


def small(**over):
    return CRLTAC.from_preset('placed-mnist', batch_size=8, p_crops=4, encoder_widths=(4, 8), rep_dim=16,
                              head_hidden=16, code_dim=8, **over)


def test_resume_is_exact(tmp_path):
    torch.set_num_threads(1)
    data, over = canvases(), dict(p_warmup_steps=2, p_include_same_t=False, p_gradient='outer')
    torch.manual_seed(0)
    a = fit(small(**over), data, epochs=2, out=tmp_path / 'a', progress=False, log_every=1, checkpoint_every=100)
    torch.manual_seed(0)                                          # the same run, stopped after 3 steps ...
    fit(small(**over), data, epochs=2, out=tmp_path / 'b', max_steps=3, progress=False, log_every=1,
        checkpoint_every=100)
    torch.manual_seed(2)                                          # ... resumed into other initial weights
    b = fit(small(**over), data, epochs=2, out=tmp_path / 'b', resume=True, progress=False, log_every=1,
            checkpoint_every=100)
    assert a.step == b.step == 8
    for (k, va), vb in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.equal(va, vb), k
    m = load_run(tmp_path / 'a', device='cpu')
    with torch.no_grad():
        f, g = m.features(data.images[:4]), a.method.eval().features(data.images[:4])
    assert set(f) == {'h', 'f', 'h_top8', 'f_top8', 'h_oracle', 'f_oracle'}
    for k in f: assert torch.allclose(f[k], g[k]), k
