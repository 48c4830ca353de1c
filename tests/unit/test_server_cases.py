"""Server-side cases go through a run directory and the server view, bit for bit (issue 18,
item 2).

The reference records of the quality tests and benchmarks (``fl_sim.cases.make_record``,
``fedavg_delta_record``, ``diffusion_record``, ``diffusion_delta_record``) are written with the
server tap's store writers and read back through ``Run.view("server", grant=...)``. Here each
is compared with the same update computed by hand, as the records were built before they went
through the view: every tensor must be ``torch.equal`` (so every figure measured on them is
unchanged), the grant must be exactly what the case declares, and the view must refuse what
the server may not have.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from attack_cases import cifar_images, cifar_labels

from fl_sim.cases import (
    diffusion_delta_record,
    diffusion_record,
    digits_victims,
    draw_aux,
    fedavg_delta_record,
    global_task,
    make_record,
    make_task,
    server_record,
    with_update,
)
from fl_sim.errors import ThreatModelError
from fl_sim.records import TruthStep
from fl_sim.tasks.base import Batch


def _equal(a, b) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_classifier_gradient_bit_identical_and_labels_granted_from_truth():
    task, spec = make_task("lenet", seed=0)
    x, y = cifar_images(2), cifar_labels(2)
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    bufs = {k: v.detach() for k, v in task.model.named_buffers()}
    grads = torch.func.grad(lambda p: task.loss(p, bufs, Batch(x, y), {}))(params)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    _equal(rec.update, grads)
    _equal(rec.global_params, task.model.state_dict())
    assert rec.tap == "server_in" and rec.update_kind == "gradient"
    assert (rec.num_examples, rec.local_steps, rec.batch_size) == (2, 1, 2)
    assert rec.knowledge["granted"] == ("labels",) and torch.equal(rec.knowledge["labels"], y)
    assert make_record(task, spec, x, y).knowledge == {"granted": ()}


def test_classifier_fedavg_delta_bit_identical():
    task, spec = make_task("lenet", seed=1)
    x, y = cifar_images(4), cifar_labels(4)
    model = copy.deepcopy(task.model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(3):  # batch 2 over 4 images: rows 0 1, 2 3, 0 1
        idx = [(k * 2 + j) % 4 for j in range(2)]
        opt.zero_grad()
        F.cross_entropy(model(task.normalize(x[idx])), y[idx]).backward()
        opt.step()
    glob, new = task.model.state_dict(), model.state_dict()
    rec = fedavg_delta_record(task, spec, x, y, lr=0.1, steps=3, batch_size=2,
                              knowledge={"labels": y})
    _equal(rec.update, {k: new[k] - glob[k] for k in glob if glob[k].is_floating_point()})
    assert (rec.update_kind, rec.local_steps, rec.lr, rec.batch_size) == ("delta", 3, 0.1, 2)
    assert torch.equal(rec.knowledge["labels"], y)


def test_diffusion_gradient_and_delta_bit_identical_with_eps_t_granted():
    task, spec = global_task(None, seed=0)
    x = digits_victims(2)
    aux = draw_aux(2, t=[50, 700], seed=3)
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    bufs = {k: v.detach() for k, v in task.model.named_buffers()}
    zeros = torch.zeros(2, dtype=torch.int64)
    grads = torch.func.grad(lambda p: task.loss(p, bufs, Batch(x, zeros), aux))(params)
    rec = diffusion_record(task, spec, x, aux=aux)
    _equal(rec.update, grads)
    assert rec.knowledge["granted"] == ("eps", "t")
    assert torch.equal(rec.knowledge["eps"], aux["eps"]) and torch.equal(rec.knowledge["t"],
                                                                         aux["t"])
    assert diffusion_record(task, spec, x, aux=aux, grant=False).knowledge == {"granted": ()}

    aux2 = draw_aux(2, seed=5)  # 2 steps of batch 1: eps/t rows concatenated over steps
    p = dict(params)
    for k in range(2):
        rows = {key: v[k:k + 1] for key, v in aux2.items()}
        g = torch.func.grad(lambda q, r=rows, i=k: task.loss(
            q, bufs, Batch(x[[i]], zeros[:1]), r))(p)
        p = {n: p[n] - 0.05 * g[n] for n in p}
    delta = diffusion_delta_record(task, spec, x, lr=0.05, steps=2, batch_size=1, seed=5)
    _equal(delta.update, {n: p[n] - params[n] for n in params})
    assert torch.equal(delta.knowledge["eps"], aux2["eps"])
    assert torch.equal(delta.knowledge["t"], aux2["t"])


def test_view_refuses_what_the_server_may_not_have(tmp_path):
    task, spec = make_task("lenet", seed=0)
    x, y = cifar_images(1), cifar_labels(1)
    state = task.model.state_dict()
    upd = {k: torch.zeros_like(v) for k, v in task.model.named_parameters()}
    steps = [TruthStep(0, x, y, torch.arange(1))]
    kw = {"spec": spec, "global_params": state, "update_kind": "gradient", "steps": steps}
    with pytest.raises(ThreatModelError, match="cannot grant 'eps'"):
        server_record(upd, grant=("eps",), **kw)  # a classifier client drew no eps
    with pytest.raises(ThreatModelError, match="cannot grant 'images'"):
        server_record(upd, grant=("images",), **kw)  # the private images are never granted
    with pytest.raises(ThreatModelError, match="differs"):  # labels the client did not use
        server_record(upd, grant=("labels",), declared={"labels": (y + 1) % 10}, **kw)
    rec = server_record(upd, grant=("labels",), run_dir=tmp_path / "case", **kw)
    from fl_sim.run_dir import load_run
    with pytest.raises(ThreatModelError):  # the case records no peer
        load_run(tmp_path / "case").view("peer", client=0)
    assert rec.run_id == "test" and rec.client_id == 0 and rec.server_round == 1


def test_a_defended_update_is_recorded_again_with_the_same_grant():
    task, spec = make_task("lenet", seed=0)
    x, y = cifar_images(1), cifar_labels(1)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    halved = {k: v / 2 for k, v in rec.update.items()}
    out = with_update(rec, halved, x, y, defenses=({"name": "halve"},))
    _equal(out.update, halved)
    _equal(out.global_params, rec.global_params)
    assert out.defenses == ({"name": "halve"},) and out.knowledge["granted"] == ("labels",)
    assert torch.equal(out.knowledge["labels"], y)
