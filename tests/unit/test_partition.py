"""Partitioners: disjoint covers, label skew as measured, determinism, caps, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_sim.data import ImageData, load_data, partition_dataset
from fl_sim.data.partition import FRAMEWORK_PARAMS
from fl_sim.errors import ConfigError
from fl_sim.registry import PARTITIONERS, validate_params

COVERING = [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("dirichlet", {"alpha": 0.1}),
            ("pathological", {"classes_per_client": 2}), ("by_identity", {})]


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_data("digits", image_size=8).train


def _mean_tv(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of client label histograms to the global one."""
    k = int(labels.max()) + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p)
                                       - glob).sum() for p in parts]))


def test_registered_names() -> None:
    assert {"iid", "dirichlet", "pathological", "by_identity"} <= set(PARTITIONERS.names())


@pytest.mark.parametrize("name, params", COVERING)
def test_partition_is_a_disjoint_cover(digits: ImageData, name: str, params: dict) -> None:
    parts = partition_dataset(digits, name, 5, seed=0, **params)
    assert len(parts) == 5 and all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat)) == len(digits)  # sizes add up, no index twice
    assert flat.min() >= 0 and flat.max() < len(digits)


def test_iid_sizes_balanced(digits: ImageData) -> None:
    sizes = [len(p) for p in partition_dataset(digits, "iid", 7, seed=3)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_alpha_controls_label_skew(digits: ImageData) -> None:
    labels = digits.labels.numpy()
    near_iid = _mean_tv(labels, partition_dataset(digits, "dirichlet", 10, seed=0, alpha=1000))
    skewed = _mean_tv(labels, partition_dataset(digits, "dirichlet", 10, seed=0, alpha=0.1))
    assert near_iid < 0.1  # measured ~0.015
    assert skewed > 0.4  # measured ~0.65-0.74 over seeds 0-3


def test_dirichlet_min_size_and_errors(digits: ImageData) -> None:
    parts = partition_dataset(digits, "dirichlet", 10, seed=0, alpha=0.1, min_size=30)
    assert min(len(p) for p in parts) >= 30
    with pytest.raises(ConfigError, match="min_size=140"):
        partition_dataset(digits, "dirichlet", 10, seed=0, alpha=0.05, min_size=140,
                          max_retries=3)
    with pytest.raises(ConfigError, match="alpha"):
        partition_dataset(digits, "dirichlet", 4, seed=0, alpha=0.0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_at_most_k_classes(digits: ImageData, k: int) -> None:
    labels = digits.labels.numpy()
    parts = partition_dataset(digits, "pathological", 10, seed=1, classes_per_client=k)
    assert all(len(np.unique(labels[p])) <= k for p in parts)
    assert sum(len(p) for p in parts) == len(digits)


def test_pathological_fewer_shards_than_classes_drops_classes(digits: ImageData) -> None:
    labels = digits.labels.numpy()
    parts = partition_dataset(digits, "pathological", 2, seed=0, classes_per_client=2)
    assert len(np.unique(labels[np.concatenate(parts)])) == 4
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_pathological_classes_smaller_than_their_shard_share() -> None:
    # 10 samples of 10 classes for 10 clients x 2 shards: each class has 1 sample, so only
    # 10 shards exist (not 20); every sample is still assigned exactly once
    parts = PARTITIONERS.get("pathological")(np.arange(10), 10, rng=np.random.default_rng(0),
                                              classes_per_client=2)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_by_identity_one_person_per_client(tmp_path: Path) -> None:
    """Olivetti's layout (40 identities × 10 images, ``x``/``y``), built here."""
    x = np.random.default_rng(0).integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "faces.npz", x=x, y=np.repeat(np.arange(40), 10))
    faces = load_data("npz", path=tmp_path / "faces.npz", groups_key="y").train
    assert faces.groups is not None
    groups = faces.groups.numpy()
    parts = partition_dataset(faces, "by_identity", 40, seed=0)
    owners = [np.unique(groups[p]) for p in parts]
    assert all(len(o) == 1 for o in owners)
    assert sorted(int(o[0]) for o in owners) == list(range(40))
    pairs = partition_dataset(faces, "by_identity", 20, seed=0)  # round-robin: 2 each
    assert [np.unique(groups[p]).tolist() for p in pairs][:2] == [[0, 20], [1, 21]]
    with pytest.raises(ConfigError, match="40 identities for 41 clients"):
        partition_dataset(faces, "by_identity", 41, seed=0)


def test_by_identity_defaults_to_labels(digits: ImageData) -> None:
    labels = digits.labels.numpy()
    parts = partition_dataset(digits, "by_identity", 10, seed=0)
    assert [np.unique(labels[p]).tolist() for p in parts] == [[c] for c in range(10)]


@pytest.mark.parametrize("name, params", COVERING[:4])
def test_determinism(digits: ImageData, name: str, params: dict) -> None:
    a = partition_dataset(digits, name, 4, seed=7, **params)
    b = partition_dataset(digits, name, 4, seed=7, **params)
    c = partition_dataset(digits, name, 4, seed=8, **params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_cap_respected_and_subset(digits: ImageData) -> None:
    full = partition_dataset(digits, "dirichlet", 4, seed=2, alpha=0.5)
    capped = partition_dataset(digits, "dirichlet", 4, seed=2, alpha=0.5,
                               max_samples_per_client=20)
    assert all(len(p) == min(20, len(f)) for p, f in zip(capped, full, strict=True))
    assert all(np.isin(p, f).all() for p, f in zip(capped, full, strict=True))


def test_empty_client_and_bad_params_raise_config_error(digits: ImageData) -> None:
    tiny = digits.subset(np.arange(3))
    with pytest.raises(ConfigError, match=r"clients \[3, 4\] received no samples"):
        partition_dataset(tiny, "iid", 5, seed=0)
    with pytest.raises(ConfigError, match="partition.beta: unknown key"):
        partition_dataset(digits, "dirichlet", 4, seed=0, beta=1.0)
    with pytest.raises(ConfigError, match="max_samples_per_client"):
        partition_dataset(digits, "iid", 4, seed=0, max_samples_per_client=0)


def test_config_params_exclude_framework_arguments() -> None:
    """A config section carries only a partitioner's own params (labels/num_clients/rng not)."""
    for entry in PARTITIONERS.entries():
        validate_params(entry.obj, {}, where="partition", skip=len(FRAMEWORK_PARAMS))
    assert validate_params(PARTITIONERS.get("dirichlet"), {"alpha": 0.3}, where="partition",
                           skip=len(FRAMEWORK_PARAMS))["alpha"] == 0.3
    with pytest.raises(ConfigError, match="partition.alpha: a string where a number"):
        validate_params(PARTITIONERS.get("dirichlet"), {"alpha": "0.3"}, where="partition",
                        skip=len(FRAMEWORK_PARAMS))  # not converted (issue 23)


def test_partition_uses_labels_of_the_given_data() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    data = ImageData(torch.zeros(6, 1, 2, 2), labels, 3)
    parts = partition_dataset(data, "pathological", 3, seed=0, classes_per_client=1)
    assert sorted(np.unique(labels.numpy()[p]).tolist() for p in parts) == [[0], [1], [2]]
