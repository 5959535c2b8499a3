"""Cross-module checks of the evaluation chapter: a real `Method` from training.py through extract_features,
evaluate_method and eval.json; bad arguments; determinism; and CUDA runs (skipped without a GPU)."""
import json
import math

import numpy as np
import pytest
import torch

from equivariant_mi.data import load_dataset
from equivariant_mi.evaluation import (PROBES, alignment, budget_indices, evaluate_features, evaluate_method,
                                       extract_features, format_results, gaussian_potential, mine_estimate,
                                       mlp_probe, ndm_estimate, read_eval, uniformity, write_eval)
from equivariant_mi.method import build_method

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def mnist():
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    return train.subset(budget_indices(train.labels, 600, seed=0)), test.subset(torch.arange(300))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return build_method("toy", "tiny")


def test_method_features_through_extract(mnist, toy):
    train, _ = mnist
    toy.train()
    a = extract_features(toy, train.images, batch_size=64, device="cpu")
    b = extract_features(toy, train, batch_size=1000, device="cpu")          # an ImageSet works too
    assert set(a) == {"f", "h"} and a["f"].shape == (600, 32) and a["h"].shape == (600, 16)
    assert torch.allclose(a["f"], b["f"], atol=1e-5)                          # batch size does not matter
    assert torch.allclose(a["h"].norm(dim=1), torch.ones(600), atol=1e-5)      # the projection is on the sphere
    assert toy.training                                                       # mode restored
    with torch.no_grad():
        toy.eval()
        direct = toy.features(train.images[:10])["f"]
        toy.train()
    assert torch.allclose(a["f"][:10], direct, atol=1e-5)


def test_evaluate_method_writes_eval_json(mnist, toy, tmp_path):
    train, test = mnist
    res = evaluate_method(toy, train, test, layers=["f"], probes=("centroid", "knn"), budgets=(600, 100), seeds=(0, 1),
                          device="cpu")
    assert list(res["layers"]) == ["f"]
    r = res["layers"]["f"]["probes"]["knn"]
    assert r["600"]["accuracy"]["n"] == 2 and r["100"]["accuracy"]["n"] == 2
    assert 0.1 < r["600"]["accuracy"]["mean"] <= 1.0
    path = write_eval(tmp_path / "run", res)
    assert path == tmp_path / "run" / "eval.json" and read_eval(tmp_path / "run") == json.loads(json.dumps(res))
    assert "| knn |" in format_results(res)
    with pytest.raises(ValueError, match="eval.json"):
        read_eval(tmp_path / "elsewhere")


def test_bad_arguments_name_themselves(mnist):
    train, test = mnist
    x, xt = train.images.flatten(1).float(), test.images.flatten(1).float()
    cases = [(dict(probes=("lda",)), "`probes`"), (dict(budgets=(601,)), "`budgets`"), (dict(budgets=(0,)), "`budgets`"),
             (dict(seeds=[], budgets=(100,)), "`seeds`"),
             (dict(probe_kwargs={"svm": {}}, probes=("knn",), budgets=(100,)), "`probe_kwargs`")]
    for kw, word in cases:
        with pytest.raises(ValueError, match=word):
            evaluate_features(x, train.labels, xt, test.labels, **kw)
    with pytest.raises(ValueError, match="`train_labels`"):
        evaluate_features(x, train.labels[:-1], xt, test.labels, probes="knn", budgets=None)
    with pytest.raises(ValueError, match="width"):
        evaluate_features(x, train.labels, xt[:, :10], test.labels, probes="knn", budgets=None)
    with pytest.raises(ValueError, match="`metric`"):
        format_results({"probes": {}}, metric="f1")
    with pytest.raises(TypeError, match="`method`"):
        extract_features(42, train.images)
    with pytest.raises(ValueError, match="`images`"):
        extract_features(lambda v: v, torch.zeros(3, 28, 28, dtype=torch.uint8))


def test_unlabelled_items_are_never_drawn():
    labels = torch.tensor([0, 1, -1, 0, 1, -1, 0, 1])
    assert budget_indices(labels, None).tolist() == [0, 1, 3, 4, 6, 7]
    assert (labels[budget_indices(labels, 4, seed=3)] >= 0).all()
    with pytest.raises(ValueError, match="`budget`"):
        budget_indices(labels, 7)


def test_mlp_probe_is_deterministic_and_fixed_epochs_work(mnist):
    train, test = mnist
    x, xt = train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255
    p1 = mlp_probe(x, train.labels, seed=3, hidden=(64,), epochs=5, patience=None, device="cpu")(xt)
    p2 = mlp_probe(x, train.labels, seed=3, hidden=(64,), epochs=5, patience=None, device="cpu")(xt)
    assert np.array_equal(p1, p2) and (p1 == test.labels.numpy()).mean() > 0.6


def test_stochastic_train_features_use_the_first_draw(mnist):
    train, test = mnist
    x, xt = train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255
    stacked = torch.stack([x, torch.rand_like(x)])                    # draw 1 is noise: must not be used for training
    a = evaluate_features(stacked, train.labels, xt, test.labels, probes="centroid", budgets=None)
    b = evaluate_features(x, train.labels, xt, test.labels, probes="centroid", budgets=None)
    assert a["probes"]["centroid"]["all"] == b["probes"]["centroid"]["all"]


def test_uniformity_and_alignment_against_brute_force():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(257, 7, generator=g)
    u = torch.nn.functional.normalize(z, dim=1)
    d2 = torch.cdist(u, u) ** 2
    off = ~torch.eye(257, dtype=torch.bool)
    brute = torch.exp(-2 * d2[off]).mean()
    for chunk in (1, 50, 4096):
        assert abs(gaussian_potential(z, chunk=chunk).item() - brute.item()) < 1e-5
    assert abs(uniformity(z, t=1.0).item() - torch.exp(-d2[off]).mean().log().item()) < 1e-5
    z2 = z + 0.1 * torch.randn(257, 7, generator=g)
    u2 = torch.nn.functional.normalize(z2, dim=1)
    assert abs(alignment(z, z2).item() - (u - u2).norm(dim=1).pow(2).mean().item()) < 1e-6
    assert abs(alignment(z, z2, alpha=1, normalize=False).item() - (z - z2).norm(dim=1).mean().item()) < 1e-6


def test_every_registered_probe_runs(mnist):
    train, test = mnist
    x, xt = train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255
    kw = {"mlp": {"hidden": (32, 32), "epochs": 3, "device": "cpu"}, "dim_mlp": {"epochs": 3, "device": "cpu"},
          "svm": {"standardize": False}}
    res = evaluate_features(x, train.labels, xt, test.labels, probes=tuple(PROBES), budgets=(300,),
                            probe_kwargs={k: v for k, v in kw.items()})
    for p in PROBES:
        assert 0.3 < res["probes"][p]["300"]["accuracy"]["mean"] <= 1.0, p


@cuda
def test_cuda_extract_probes_and_estimators(mnist, toy):
    train, test = mnist
    dev = torch.device("cuda")
    toy_gpu = toy.to(dev)
    f = extract_features(toy_gpu, train.to(dev), batch_size=128)              # follows the module's device
    assert f["f"].device.type == "cpu" and f["f"].shape == (600, 32)
    x, xt = train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255
    res = evaluate_features(x, train.labels, xt, test.labels, probes=("mlp", "dim_mlp"), budgets=(600,), device=dev)
    assert res["probes"]["mlp"]["600"]["accuracy"]["mean"] > 0.7
    gx = torch.randn(4000, 2)
    gy = 0.8 * gx + 0.6 * torch.randn(4000, 2)
    m = mine_estimate(gx, gy, steps=500, batch_size=128, lr=1e-3, device=dev)
    assert abs(m["mi"] - (-math.log(1 - 0.64))) < 0.3
    a = torch.randn(4000, 1)
    z = torch.cat([a, 0.9 * a + math.sqrt(1 - 0.81) * torch.randn(4000, 1), torch.randn(4000, 2)], 1)
    n = ndm_estimate(z, steps=500, batch_size=128, lr=1e-3, device=dev)
    assert 0.4 < n["ndm"] < 0.95
    toy.to("cpu")
