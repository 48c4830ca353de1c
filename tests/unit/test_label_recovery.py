"""Label recovery (iDLG, bias-corrected batch counts) on real CIFAR-10 reference cases."""

from __future__ import annotations

import pytest
import torch
from attack_cases import (
    cifar_distinct,
    cifar_images,
    cifar_labels,
    make_record,
    make_task,
    torch_threads,
)

from attacks.components.label_recovery import (
    batch_labels,
    estimate_output_statistics,
    find_last_layer,
    idlg_label,
    recover_labels,
)
from fl_sim.cases import rerecord
from fl_sim.errors import ThreatModelError
from fl_sim.metrics import label_accuracy
from fl_sim.records import TruthStep
from fl_sim.registry import ATTACKS

MODELS = ["lenet", "convnet"]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=MODELS)
def case(request: pytest.FixtureRequest):
    return make_task(request.param, seed=0)


def test_idlg_recovers_every_single_label(case) -> None:
    task, spec = case
    images, labels = cifar_images(20), cifar_labels(20)
    found = []
    for i in range(20):
        record = make_record(task, spec, images[i:i + 1], labels[i:i + 1])
        found.append(int(recover_labels(record, "idlg", task=task).item()))
    assert found == labels.tolist()


def test_idlg_attack_returns_labels_only() -> None:
    task, spec = make_task("lenet", seed=0)
    record = make_record(task, spec, cifar_images(1, 4), cifar_labels(1, 4))
    result = ATTACKS.create("idlg", method="idlg")(record,
                                                   generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (0, 3, 32, 32)
    assert result.labels.tolist() == [6]
    assert result.extras["label_method"] == "idlg"


def test_batch_labels_distinct(case) -> None:
    task, spec = case
    images, labels = cifar_distinct(8)
    record = make_record(task, spec, images, labels)
    result = ATTACKS.create("idlg")(record, generator=torch.Generator().manual_seed(0))
    assert result.extras["label_method"] == "batch"
    assert label_accuracy(result.labels, labels) >= 0.9
    # the method's order: ascending class index (images are matched to labels after)
    assert result.labels.tolist() == sorted(labels.tolist())


def test_batch_labels_with_repeats(case) -> None:
    task, spec = case
    labels = cifar_labels(8)  # 3 8 8 0 6 6 1 6
    record = make_record(task, spec, cifar_images(8), labels)
    found = recover_labels(record, "batch", task=task, generator=torch.Generator().manual_seed(0))
    assert label_accuracy(found, labels) >= 0.875
    assert found.tolist() == sorted(found.tolist())  # ascending, as documented


def test_batch_labels_without_bias_uses_weight_rows() -> None:
    task, spec = make_task("lenet", seed=0)
    images, labels = cifar_distinct(8)
    record = make_record(task, spec, images, labels)
    layer = find_last_layer(["fc.weight", "fc.bias"],
                            {k: v.shape for k, v in record.update.items()}, 10)
    probs, feature_sum = estimate_output_statistics(
        task, record, layer, generator=torch.Generator().manual_seed(0))
    found = batch_labels(record.update["fc.weight"], None, 8, mean_probs=probs,
                         mean_feature_sum=feature_sum)
    assert label_accuracy(found, labels) >= 0.9
    assert found.tolist() == sorted(labels.tolist())  # ascending, as documented
    with pytest.raises(ValueError, match="mean_feature_sum"):
        batch_labels(record.update["fc.weight"], None, 8, mean_probs=probs)


def test_delta_record_is_read_as_gradient() -> None:
    task, spec = make_task("lenet", seed=0)
    images, labels = cifar_distinct(4)
    record = make_record(task, spec, images, labels)
    delta = rerecord(record, {k: -0.1 * v for k, v in record.update.items()},
                     update_kind="delta", lr=0.1, num_examples=4,
                     steps=[TruthStep(0, images, labels, torch.arange(4))])
    found = recover_labels(delta, "batch", task=task, generator=torch.Generator().manual_seed(0))
    assert found.tolist() == sorted(labels.tolist())  # ascending, as documented


def test_find_last_layer_and_errors() -> None:
    shapes = {"a.weight": torch.Size([10, 5]), "head.weight": torch.Size([10, 7]),
              "head.bias": torch.Size([10]), "norm.weight": torch.Size([10])}
    layer = find_last_layer(list(shapes), shapes, 10)
    assert (layer.weight, layer.bias, layer.module) == ("head.weight", "head.bias", "head")
    with pytest.raises(ValueError, match="final linear layer"):
        find_last_layer(list(shapes), shapes, 3)
    assert idlg_label(torch.tensor([[1.0, 2.0], [-3.0, 1.0]])) == 1


def test_idlg_refuses_batches_and_peer_views() -> None:
    task, spec = make_task("lenet", seed=0)
    record = make_record(task, spec, cifar_images(2), cifar_labels(2))
    with pytest.raises(ValueError, match="ONE image"):
        recover_labels(record, "idlg", task=task)
    peer = make_record(task, spec, cifar_images(1), cifar_labels(1), tap="peer_view")
    with pytest.raises(ThreatModelError, match="server"):
        ATTACKS.create("idlg")(peer)
