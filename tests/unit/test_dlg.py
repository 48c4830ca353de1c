"""DLG (Zhu et al. 2019) on the DLG LeNet (sigmoid) with real CIFAR-10 test images."""

from __future__ import annotations

import pytest
import torch
from attack_cases import cifar_images, cifar_labels, make_record, make_task, torch_threads

from attacks.dlg import DLG, initial_images
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.metrics import psnr
from fl_sim.registry import ATTACKS

#: bars of the quality tests below (measured values and margins: tests/QUALITY_MARGINS.md)
MIN_GAIN_DB = 6.0  # PSNR gain over the uniform start, image 0, 5 outer L-BFGS steps
MIN_OPTIMIZED_PSNR_DB = 20.0  # image 1, labels optimised, 10 outer steps
REF_PSNR_DB = 30.0  # reference: images 0-7, >= REF_PSNR_DB on >= REF_MIN_IMAGES of 8
REF_MIN_IMAGES = 6


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # 682 s -> 33 s for the slow test on a loaded 2-core runner
        yield


@pytest.fixture(scope="module")
def lenet():
    return make_task("lenet", seed=0)


def test_dlg_improves_far_beyond_its_start(lenet) -> None:
    task, spec = lenet
    image, label = cifar_images(1), cifar_labels(1)
    record = make_record(task, spec, image, label)
    attack = ATTACKS.create("dlg", max_iterations=5)  # <= 100 L-BFGS iterations
    result = attack(record, generator=torch.Generator().manual_seed(0))
    start = initial_images((1, 3, 32, 32), "uniform", torch.Generator().manual_seed(0))
    gain = float(psnr(result.images, image) - psnr(start, image))
    assert torch.equal(result.extras["start_images"], start)  # scored as start_psnr
    assert gain >= MIN_GAIN_DB, gain
    assert result.labels.tolist() == label.tolist()
    assert result.images.shape == (1, 3, 32, 32)
    assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0
    assert 0 < result.iterations <= 100 and result.matching_loss >= 0
    assert result.knowledge == {"labels": "idlg"}


def test_dlg_optimised_labels_are_returned(lenet) -> None:
    task, spec = lenet
    image, label = cifar_images(1, 1), cifar_labels(1, 1)
    record = make_record(task, spec, image, label)
    result = ATTACKS.create("dlg", max_iterations=10, labels="optimize")(
        record, generator=torch.Generator().manual_seed(1))
    assert result.labels.tolist() == label.tolist()  # the optimised label, not a random one
    assert float(psnr(result.images, image)) > MIN_OPTIMIZED_PSNR_DB
    assert result.knowledge == {}


def test_dlg_granted_labels_need_knowledge(lenet) -> None:
    task, spec = lenet
    images, labels = cifar_images(2), cifar_labels(2)
    attack = ATTACKS.create("dlg", labels="granted", max_iterations=1, inner_iterations=2)
    assert attack.required_knowledge() == ("labels",)
    with pytest.raises(ThreatModelError, match="labels"):
        attack(make_record(task, spec, images, labels))
    granted = make_record(task, spec, images, labels, knowledge={"labels": labels})
    result = attack(granted, generator=torch.Generator().manual_seed(0))
    assert result.labels.tolist() == labels.tolist()
    assert result.images.shape == (2, 3, 32, 32)


def test_dlg_refuses_peer_view_and_bad_config(lenet) -> None:
    task, spec = lenet
    peer = make_record(task, spec, cifar_images(1), cifar_labels(1), tap="peer_view")
    with pytest.raises(ThreatModelError, match="server"):
        DLG()(peer)
    with pytest.raises(ConfigError, match="labels"):
        ATTACKS.create("dlg", labels="bogus")
    with pytest.raises(ValueError, match="restarts"):
        DLG(restarts=0)


@pytest.mark.slow
def test_dlg_reference_lenet_batch1(lenet) -> None:
    """DLG + iDLG labels, 8 single images: >= 30 dB on at least 6 (35.5-38 dB measured)."""
    task, spec = lenet
    images, labels = cifar_images(8), cifar_labels(8)
    attack = ATTACKS.create("dlg", max_iterations=25)  # <= 500 L-BFGS iterations
    psnrs = []
    for i in range(8):
        record = make_record(task, spec, images[i:i + 1], labels[i:i + 1])
        result = attack(record, generator=torch.Generator().manual_seed(i))
        assert result.labels.tolist() == [int(labels[i])]
        psnrs.append(float(psnr(result.images, images[i:i + 1])))
    assert sum(p >= REF_PSNR_DB for p in psnrs) >= REF_MIN_IMAGES, psnrs


def test_train_mode_uses_batch_statistics_and_leaves_the_record_alone() -> None:
    """``model_mode="train"``: BatchNorm on batch statistics, as a training client's forward
    pass; no attack may mutate the record's running statistics (or crash inside torch.func)."""
    import copy

    import torch.nn.functional as F
    from attack_cases import make_spec

    from attacks.components.gradients import attack_task, parameter_gradients, split_state
    from attacks.idlg import IDLG
    from fl_sim.tasks import build_task
    from fl_sim.tasks.base import Batch

    spec = make_spec("convnet", {"width": 8}, image_size=16)
    task = build_task(spec, seed=0)
    x, y = F.adaptive_avg_pool2d(cifar_images(2), 16), cifar_labels(2)
    task.model.eval()
    record = make_record(task, spec, x, y)
    before = {k: v.clone() for k, v in record.global_params.items()}
    client = copy.deepcopy(task.model).train()  # what a client in train mode computes
    F.cross_entropy(client(task.normalize(x)), y).backward()
    lean = attack_task(record, "train")
    params, buffers = split_state(lean, record.global_params)
    grads = parameter_gradients(lean, params, buffers, Batch(x, y))
    for name, p in client.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4)
    gen = torch.Generator().manual_seed(0)
    IDLG(model_mode="train", method="batch")(record, generator=gen)
    DLG(model_mode="train", max_iterations=1, inner_iterations=2)(record, generator=gen)
    for k, v in record.global_params.items():
        assert torch.equal(v, before[k]), k


def test_dlg_reports_progress_through_the_shared_reporter(lenet) -> None:
    """A tiny DLG run (image 0, 2 outer L-BFGS steps of <= 3 iterations, 2 restarts) reports
    its L-BFGS iterations to the listener the CLI installs: each restart is a phase whose
    first line comes at once, the counts never go back, and the last count of the winning
    restart is the iterations the result states."""
    from attacks.components.progress import reporting
    from fl_sim.attack_plan import progress_lines

    task, spec = lenet
    record = make_record(task, spec, cifar_images(1), cifar_labels(1))
    seen: list[tuple[str, int, int]] = []
    lines: list[str] = []
    listener = progress_lines("dlg", every=0.0, write=lines.append)

    def both(phase: str, done: int, total: int) -> None:
        seen.append((phase, done, total))
        listener(phase, done, total)

    attack = ATTACKS.create("dlg", max_iterations=2, inner_iterations=3, restarts=2)
    with reporting(both):
        result = attack(record, generator=torch.Generator().manual_seed(0))
    assert [p for p in dict.fromkeys(p for p, _, _ in seen)] == ["restart 1/2", "restart 2/2"]
    for phase in ("restart 1/2", "restart 2/2"):
        done = [d for p, d, _ in seen if p == phase]
        assert done[0] == 0 and done == sorted(done) and max(done) <= 6
    assert {t for _, _, t in seen} == {6}  # 2 outer steps x 3 inner iterations
    assert result.iterations in {max(d for p, d, _ in seen if p == ph)
                                 for ph in ("restart 1/2", "restart 2/2")}
    assert lines[0].startswith("dlg: restart 1/2 0/6") and len(lines) == len(seen)


def test_dlg_progress_lines_are_throttled(lenet) -> None:
    """With the CLI's default (a line at most every 10 s) a sub-second run writes one line."""
    from attacks.components.progress import reporting
    from fl_sim.attack_plan import progress_lines

    task, spec = lenet
    record = make_record(task, spec, cifar_images(1), cifar_labels(1))
    lines: list[str] = []
    with reporting(progress_lines("dlg", write=lines.append)):
        ATTACKS.create("dlg", max_iterations=1, inner_iterations=2)(
            record, generator=torch.Generator().manual_seed(0))
    assert len(lines) == 1 and lines[0].startswith("dlg: iterations 0/2, ")
