"""Curious-peer inversion: a client reconstructs the other clients' images from the aggregate.

The peer records are built by hand here from the clients' own gradients / local training (the
federation derives the same record from consecutive global models in a real Flower run).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from attack_cases import cifar_images, cifar_labels, make_spec

from attacks.gradients import parameter_gradients, split_state
from attacks.inverting_gradients import InvertingGradients
from attacks.objectives import NormalisedImages, cosine_distance
from attacks.peer_inversion import PeerInversion
from fl_sim.errors import ThreatModelError
from fl_sim.metrics import psnr, score_reconstruction
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.tasks import build_task
from fl_sim.tasks.base import Batch


def init_psnr(spec, truth: torch.Tensor, seed: int) -> float:
    """PSNR of the attack's random start (same generator draw as restart 0)."""
    cand = NormalisedImages((1, *truth.shape), spec.mean, spec.std,
                            generator=torch.Generator().manual_seed(seed))
    cand.clamp_()
    return float(psnr(cand.images()[0].detach(), truth).mean())


def _setup(model: str, params: dict, size: int, clients: int, per_client: int):
    spec = make_spec(model, params, image_size=size)
    task = build_task(spec, seed=0)
    task.model.eval()
    x = cifar_images(clients * per_client)
    if size != 32:
        x = F.adaptive_avg_pool2d(x, size)
    y = cifar_labels(clients * per_client)
    return task, spec, x.split(per_client), y.split(per_client)


def _peer_record(task, spec, update, own, *, kind, others: int, num_examples: int,
                 labels, lr=0.0, steps=1, batch_size=1) -> ObservationRecord:
    return ObservationRecord(
        run_id="test", server_round=1, client_id=0, tap="peer_view", spec=spec,
        global_params={k: v.clone() for k, v in task.model.state_dict().items()},
        update=update, update_kind=kind, num_examples=num_examples, local_steps=steps, lr=lr,
        batch_size=batch_size, knowledge={"labels": labels}, own_update=own,
        num_clients_aggregated=others)


def fedsgd_peer_record(task, spec, xs, ys) -> ObservationRecord:
    """Peer = client 0; FedSGD with equal batches: others' aggregate = mean of their grads."""
    params, buffers = split_state(task, task.model.state_dict())
    grads = [parameter_gradients(task, params, buffers, Batch(x, y))
             for x, y in zip(xs, ys, strict=True)]
    others = grads[1:]
    update = {k: sum(g[k] for g in others) / len(others) for k in params}
    return _peer_record(task, spec, update, grads[0], kind="gradient", others=len(others),
                        num_examples=sum(len(y) for y in ys[1:]),
                        labels=torch.cat(ys[1:]), batch_size=len(ys[0]))


def local_delta(task, x, y, *, lr, steps, batch_size):
    model = copy.deepcopy(task.model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(steps):
        idx = [(k * batch_size + j) % len(y) for j in range(batch_size)]
        opt.zero_grad()
        F.cross_entropy(model(task.normalize(x[idx])), y[idx]).backward()
        opt.step()
    return {n: p.detach() - task.model.get_parameter(n).detach()
            for n, p in model.named_parameters()}


def test_registered_peer_view_only():
    assert ATTACKS.get("peer_inversion") is PeerInversion
    assert PeerInversion.view == "peer"
    task, spec, xs, ys = _setup("lenet", {}, 16, 3, 1)
    rec = fedsgd_peer_record(task, spec, xs, ys)
    server_rec = ObservationRecord(**{**rec.__dict__, "tap": "server_in"})
    with pytest.raises(ThreatModelError, match="peer"):
        PeerInversion(max_iterations=1)(server_rec)
    with pytest.raises(ThreatModelError, match="server"):
        InvertingGradients(max_iterations=1)(rec)


def test_fedavg_peer_plan_reproduces_others_aggregate():
    """At the true images the per-client unrolling matches the aggregate delta exactly."""
    task, spec, xs, ys = _setup("convnet", {"width": 8}, 16, 3, 2)
    kw = {"lr": 0.1, "steps": 2, "batch_size": 1}
    deltas = [local_delta(task, x, y, **kw) for x, y in zip(xs, ys, strict=True)]
    update = {k: (deltas[1][k] + deltas[2][k]) / 2 for k in deltas[0]}
    rec = _peer_record(task, spec, update, deltas[0], kind="delta", others=2, num_examples=4,
                       labels=torch.cat(ys[1:]), **kw)
    from attacks.inverting_gradients import _update_fn
    problem, _ = PeerInversion(labels="granted").problem(rec, generator=torch.Generator())
    assert problem.unroll is not None and problem.unroll.clients == 2
    truth = torch.cat(xs[1:])[None]
    upd, _ = _update_fn(problem, None)(truth)
    assert float(cosine_distance(upd, problem.target)[0]) < 1e-5
    problem.unroll = type(problem.unroll)(0.1, 2, 1, clients=1)  # one client with 4 images
    upd, _ = _update_fn(problem, None)(truth)
    assert float(cosine_distance(upd, problem.target)[0]) > 1e-3


def test_peer_reconstruction_small_beats_random_start(one_thread):
    task, spec, xs, ys = _setup("lenet", {}, 16, 3, 1)
    rec = fedsgd_peer_record(task, spec, xs, ys)
    out = PeerInversion(max_iterations=300, labels="granted")(
        rec, generator=torch.Generator().manual_seed(0))
    truth = torch.cat(xs[1:])
    assert out.images.shape == truth.shape
    gained = score_reconstruction(out.images, truth)["psnr"] - init_psnr(spec, truth, seed=0)
    assert gained >= 6.0, gained


@pytest.mark.slow
def test_peer_reconstruction_convnet_3_clients_fedsgd():
    """The reference curious-peer case: ConvNet-64, 3 clients, FedSGD, one image each."""
    task, spec, xs, ys = _setup("convnet", {"width": 64}, 32, 3, 1)
    rec = fedsgd_peer_record(task, spec, xs, ys)
    out = PeerInversion(max_iterations=300, labels="granted")(
        rec, generator=torch.Generator().manual_seed(0))
    truth = torch.cat(xs[1:])
    gained = score_reconstruction(out.images, truth)["psnr"] - init_psnr(spec, truth, seed=0)
    assert gained >= 6.0, gained
