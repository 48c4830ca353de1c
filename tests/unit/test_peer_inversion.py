"""Curious-peer inversion: a client reconstructs the other clients' images from the aggregate.

Every case is a recorded run directory written by :func:`fl_sim.cases.build_case` (the
clients' real local work, the taps' own writers, no Ray) and read back through
:func:`fl_sim.run_dir.load_run` and the PEER view: the record is what client 0 derives from
consecutive globals, granted nothing (labels are recovered by the attack itself). The cases
are fixed by rule before any outcome: CIFAR-10 test images from index 0, client ``k`` holding
images ``k*P .. k*P+P-1``, the peer is client 0, model seed 0, attack seed 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attack_cases import CIFAR_FILE, cifar_images, cifar_labels, make_spec

from attacks.components.objectives import NormalisedImages, cosine_distance
from attacks.inverting_gradients import InvertingGradients
from attacks.peer_inversion import PeerInversion
from fl_sim.cases import CaseClient, build_case, others_truth
from fl_sim.errors import ThreatModelError
from fl_sim.metrics import psnr, score_reconstruction
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.run_dir import Run, load_run
from fl_sim.tasks import build_task

#: PSNR gain over the random start (dB) of the small case; measured 6.93 dB on 2026-12-07
#: (labels recovered by the peer: 2 of 2 right), bar 6.0 (tests/QUALITY_MARGINS.md)
MIN_SMALL_GAIN_DB = 6.0
#: the same for the ConvNet-64 reference case (slow); measured 2.80 dB on 2026-12-07 with the
#: peer's train-mode default (2.42 dB in eval mode; see the test's docstring for why it is far
#: below the 6 dB of the old hand-built, eval-mode record)
MIN_CONVNET_GAIN_DB = 1.5


def init_psnr(spec, truth: torch.Tensor, seed: int) -> float:
    """PSNR of the attack's random start (same generator draw as restart 0)."""
    cand = NormalisedImages((1, *truth.shape), spec.mean, spec.std,
                            generator=torch.Generator().manual_seed(seed))
    cand.clamp_()
    return float(psnr(cand.images()[0].detach(), truth).mean())


def cifar_case(path: Path, model: str, params: dict, size: int, clients: int,
               per_client: int, **case) -> Run:
    """A recorded run: ``clients`` clients, client ``k`` holding CIFAR-10 test images
    ``k*per_client ..`` (average-pooled to ``size``), peer = client 0; ``case``: the
    strategy and training keywords of :func:`build_case`."""
    spec = make_spec(model, params, image_size=size)
    task = build_task(spec, seed=0)
    x = cifar_images(clients * per_client)
    if size != 32:
        x = F.adaptive_avg_pool2d(x, size)
    y = cifar_labels(clients * per_client)
    idx = torch.arange(clients * per_client)
    data = [CaseClient(*(t[k * per_client:(k + 1) * per_client] for t in (x, y, idx)))
            for k in range(clients)]
    return load_run(build_case(path, spec=spec, global_state=task.model.state_dict(),
                               clients=data, data={"name": "npz", "path": str(CIFAR_FILE)},
                               **case))


def peer_record(run: Run, attack: PeerInversion) -> ObservationRecord:
    """Client 0's peer record of round 1, granted what the attack asks (as the runner)."""
    return run.view("peer", client=0, grant=attack.required_knowledge()).record(1)


def test_registered_peer_view_only(tmp_path):
    assert ATTACKS.get("peer_inversion") is PeerInversion
    assert PeerInversion.view == "peer"
    run = cifar_case(tmp_path / "c", "lenet", {}, 16, 3, 1, strategy="fedsgd")
    rec = peer_record(run, PeerInversion(max_iterations=1))
    assert rec.tap == "peer_view" and dict(rec.knowledge)["granted"] == ()
    server_rec = ObservationRecord(**{**rec.__dict__, "tap": "server_in"})
    with pytest.raises(ThreatModelError, match="peer"):
        PeerInversion(max_iterations=1)(server_rec)
    with pytest.raises(ThreatModelError, match="server"):
        InvertingGradients(max_iterations=1)(rec)
    with pytest.raises(ThreatModelError, match="granted no ground truth"):
        PeerInversion(labels="granted")


def test_fedavg_peer_plan_reproduces_others_aggregate(tmp_path):
    """At the true images (in the order the clients used them) and true labels, the
    per-client unrolling reproduces the derived aggregate delta; unrolling the four images
    as ONE client does not. An oracle check of the maths (truth read from the truth store
    by the test, never by the attack); the sigmoid LeNet has no BatchNorm, so the clients'
    train mode equals the attack's eval-mode model."""
    kw = {"strategy": "fedavg", "lr": 0.1, "local_steps": 2, "batch_size": 1}
    run = cifar_case(tmp_path / "c", "lenet", {}, 16, 3, 2, **kw)
    rec = peer_record(run, PeerInversion(labels="batch"))
    assert rec.update_kind == "delta" and rec.num_clients_aggregated == 2
    from attacks.inverting_gradients import _update_fn
    problem, _ = PeerInversion(labels="batch").problem(rec, generator=torch.Generator())
    assert problem.unroll is not None and problem.unroll.clients == 2
    images, labels = others_truth(run, 1, 0)  # first-seen order = the order of the steps
    problem.labels = labels.to(problem.labels)
    upd, _ = _update_fn(problem, None)(images[None])
    # float32 globals: the peer's derivation carries ~1e-6 relative rounding
    assert float(cosine_distance(upd, problem.target)[0]) < 1e-4
    problem.unroll = type(problem.unroll)(0.1, 2, 1, clients=1)  # one client with 4 images
    upd, _ = _update_fn(problem, None)(images[None])
    assert float(cosine_distance(upd, problem.target)[0]) > 1e-2


def test_train_mode_reproduces_batchnorm_clients_gradient(tmp_path, one_thread):
    """A BatchNorm ConvNet (width 16, 16x16), 3 clients with one image each, FedSGD: at the
    true images and labels the peer's default ``model_mode="train"`` (each other client
    forwarded alone, batch statistics, as fl-sim's clients train) reproduces the derived
    aggregate (cosine distance measured 2026-12-07: 1.2e-7, bar 1e-4: float32 rounding of the
    derivation); eval mode (running statistics) does not (measured 0.97, bar > 0.5), nor does
    train mode with both images in ONE batch (mixed batch statistics; measured 0.77, bar
    > 0.3). An oracle check (truth read by the test, never by the attack)."""
    run = cifar_case(tmp_path / "c", "convnet", {"width": 16}, 16, 3, 1, strategy="fedsgd")
    images, labels = others_truth(run, 1, 0)
    from attacks.inverting_gradients import _update_fn

    def distance(mode: str, groups: int | None = None) -> float:
        attack = PeerInversion(labels="batch", model_mode=mode)
        problem, _ = attack.problem(peer_record(run, attack), generator=torch.Generator())
        problem.labels = labels.to(problem.labels)
        if groups is not None:
            problem.groups = groups
        with torch.no_grad():
            upd, _ = _update_fn(problem, None)(images[None])
            d = float(cosine_distance(upd, problem.target)[0])
            if mode == "train" and groups is None:  # two restarts: the vmapped grouped path
                two, _ = _update_fn(problem, None)(images[None].expand(2, *images.shape))
                assert abs(float(cosine_distance(two, problem.target)[1]) - d) < 1e-5
        return d

    assert PeerInversion().model_mode == "train"
    train = distance("train")
    assert train < 1e-4, train
    evald = distance("eval")
    assert evald > 0.5, evald
    joint = distance("train", groups=1)
    assert joint > 0.3, joint


def test_peer_reconstruction_small_beats_random_start(tmp_path, one_thread):
    """LeNet (sigmoid), 16x16, 3 clients with one image each, FedSGD; the peer recovers the
    two others' labels itself (``auto``: batch label recovery). Measured 2026-12-07: PSNR
    gain over the random start +6.93 dB (15.33 dB), both labels right; asserted
    >= ``MIN_SMALL_GAIN_DB`` = 6.0 (margin 0.93)."""
    run = cifar_case(tmp_path / "c", "lenet", {}, 16, 3, 1, strategy="fedsgd")
    attack = PeerInversion(max_iterations=300)
    out = attack(peer_record(run, attack), generator=torch.Generator().manual_seed(0))
    truth, _ = others_truth(run, 1, 0)
    assert out.images.shape == truth.shape
    gained = score_reconstruction(out.images, truth)["psnr"] - init_psnr(run.spec, truth, 0)
    assert gained >= MIN_SMALL_GAIN_DB, gained


@pytest.mark.slow
def test_peer_reconstruction_convnet_3_clients_fedsgd(tmp_path):
    """The reference curious-peer case: ConvNet-64, 3 clients, FedSGD, one image each, the
    clients' gradients taken in train mode (as a real client does), labels recovered.

    Re-measured 2026-12-07 with the peer's default ``model_mode="train"`` (each other
    client's gradient recomputed with its own batch statistics, as the clients took it):
    +2.80 dB over the random start (11.08 dB; both labels right), asserted >=
    ``MIN_CONVNET_GAIN_DB`` = 1.5 (margin 1.30). Before the option, in eval mode: +2.42 dB
    (10.70 dB); the cosine between the train-mode and the eval-mode gradient of CIFAR-10 test
    image 1 on this ConvNet is 0.10. The old figure (>= 6 dB) came from a hand-built record
    whose gradients were taken in EVAL mode and with the true labels granted; a matching
    BatchNorm model alone does not bring that back (why was not measured).
    """
    run = cifar_case(tmp_path / "c", "convnet", {"width": 64}, 32, 3, 1, strategy="fedsgd")
    attack = PeerInversion(max_iterations=300)
    out = attack(peer_record(run, attack), generator=torch.Generator().manual_seed(0))
    truth, _ = others_truth(run, 1, 0)
    gained = score_reconstruction(out.images, truth)["psnr"] - init_psnr(run.spec, truth, 0)
    assert gained >= MIN_CONVNET_GAIN_DB, gained
