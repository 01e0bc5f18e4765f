"""Bundled data for the lab: scikit-learn's 8×8 digits, split and standardized, no downloads.

The split and the standardization are fixed (permutation seed 0, training statistics), so
every experiment and every run sees the same tensors.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

N_SAMPLES = 1797
N_TRAIN = 1437
N_FEATURES = 64
N_CLASSES = 10
SPLIT_SEED = 0


class Digits(NamedTuple):
    """The digits split: float32 standardized features and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@functools.cache
def load_digits() -> Digits:
    """Load scikit-learn's digits (1,797 × 64, 10 classes) as a fixed 1,437 / 360 split.

    The rows are shuffled with ``torch.randperm(1797)`` under seed 0; each feature is then
    standardized with the training mean and standard deviation. Pixels that are constant
    in the training set (their std is 0) become 0. Unit-variance inputs are what the
    initialization analyses assume. The result is cached in-process; treat it as read-only.

    Returns:
        The four tensors, float32 features and int64 labels.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = perm[:N_TRAIN], perm[N_TRAIN:]
    mean = x[train].mean(dim=0)
    std = x[train].std(dim=0)
    constant = std == 0
    std = torch.where(constant, torch.ones_like(std), std)
    x = torch.where(constant, torch.zeros_like(x), (x - mean) / std).float()
    return Digits(x[train], y[train], x[test], y[test])
