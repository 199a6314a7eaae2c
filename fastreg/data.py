"""Datasets by name: the bundled 8×8 digits (scikit-learn, nothing downloaded) and, through
torchvision, MNIST and CIFAR-10/100 from ``data_dir`` (``download=True`` fetches them).

``load_dataset(name, data_dir, download)`` → :class:`DatasetInfo` with the train and test sets,
the number of classes and the input shape (C, H, W).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

DATASETS = ("digits", "mnist", "cifar10", "cifar100")

# Per-channel mean / std used to normalise each dataset.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class DatasetInfo:
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> DatasetInfo:
    """scikit-learn's 1,797 8×8 handwritten digits (pixel values 0–16), scaled to [0, 1] and
    standardised with the training split's mean and std; a fixed stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = stratified_split(y, test_fraction, split_seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return DatasetInfo("digits", TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), 10, (1, 8, 8))


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices: round(test_fraction · n_c) random samples of every class c go to test."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _torchvision(name: str, data_dir: str, download: bool, augment: bool) -> DatasetInfo:
    import torchvision
    from torchvision import transforms as T

    mean, std = _STATS[name]
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if name == "mnist":
        cls, num_classes, shape, train_tf = torchvision.datasets.MNIST, 10, (1, 28, 28), normalize
    else:
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        num_classes, shape = (10 if name == "cifar10" else 100), (3, 32, 32)
        train_tf = ([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []) + normalize
    try:
        train = cls(data_dir, train=True, download=download, transform=T.Compose(train_tf))
        test = cls(data_dir, train=False, download=download, transform=T.Compose(normalize))
    except RuntimeError as err:
        raise FileNotFoundError(
            f"dataset {name!r} not found under data_dir={data_dir!r}; pass --download to fetch it ({err})"
        ) from err
    return DatasetInfo(name, train, test, num_classes, shape)


def load_dataset(name: str, data_dir: str = "./data", download: bool = False, augment: bool = True) -> DatasetInfo:
    """The dataset ``name`` (one of :data:`DATASETS`)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if key == "digits":
        return digits()
    return _torchvision(key, data_dir, download, augment)


def first_batch(dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of ``dataset`` stacked into (inputs, labels)."""
    n = min(n, len(dataset))
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][:n], dataset.tensors[1][:n]
    xs, ys = zip(*(dataset[i] for i in range(n)))
    return torch.stack(xs), torch.as_tensor(ys)
