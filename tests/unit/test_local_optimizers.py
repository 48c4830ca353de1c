"""The functional local optimisers (attacks/components/local_optimizers.py) take the client's steps.

(a) After k steps, :func:`functional_step` gives the parameters torch.optim.SGD (momentum,
weight decay) / torch.optim.Adam (betas, eps, weight decay) give, to float tolerance (1e-6
relative; measured max difference ~1e-7). (b) The client's own training code
(``fl_sim.federation.local.local_train``, which builds its optimiser fresh every round) is
reproduced by unrolling from a FRESH state on the batches it recorded as ground truth, in round 1
and in round 2: a state carried over between rounds would break round 2. (c) Unrolling stays
differentiable with respect to the images (finite derivative, matches a finite difference).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_cases import cifar_images, cifar_labels, make_spec

from attacks.components.local_optimizers import functional_step, init_state
from attacks.components.objectives import unrolled_delta
from fl_sim.federation.local import local_train, make_optimizer
from fl_sim.records import LocalOptimizer
from fl_sim.tasks import build_task
from fl_sim.tasks.base import Batch, module_tensors

OPTIMIZERS = [
    LocalOptimizer("sgd"),
    LocalOptimizer("sgd", momentum=0.9, weight_decay=1e-3),
    LocalOptimizer("adam"),
    LocalOptimizer("adam", betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
]


def _task(seed: int = 0):
    spec = make_spec("lenet", {}, image_size=16)
    task = build_task(spec, seed=seed)
    task.model.eval()
    return task


def _data(n: int):
    return F.adaptive_avg_pool2d(cifar_images(n), 16), cifar_labels(n)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: str(o.to_json()))
def test_functional_step_equals_torch_optim(opt, one_thread):
    task = _task()
    x, y = _data(8)
    params, buffers = module_tensors(task.model)
    start = {k: v.detach().clone() for k, v in params.items()}
    torch_opt = make_optimizer(opt, task.model.parameters(), 0.05)
    p, state = dict(start), init_state(opt, start)
    for k in range(5):
        batch = Batch(x[2 * k % 8:2 * k % 8 + 2], y[2 * k % 8:2 * k % 8 + 2])
        torch_opt.zero_grad()
        task.loss(dict(task.model.named_parameters()), buffers, batch, {}).backward()
        torch_opt.step()
        g = torch.func.grad(lambda q, b=batch: task.loss(q, buffers, b, {}))(p)
        p, state = functional_step(opt, p, g, state, lr=0.05, step=k + 1)
    moved = max(float((p[k] - start[k]).abs().max()) for k in p)
    assert moved > 1e-3  # the steps did something
    for name, ref in task.model.named_parameters():
        torch.testing.assert_close(p[name], ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", [OPTIMIZERS[1], OPTIMIZERS[2]], ids=("momentum", "adam"))
def test_unrolling_reproduces_the_clients_training_every_round(opt, one_thread):
    """local_train (the ClientApp's code) vs unrolled_delta from a fresh state, rounds 1, 2."""
    task = _task()
    x, y = _data(16)
    for r in (1, 2):
        glob = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        res = local_train(task, x, y, torch.arange(16), seed=0, server_round=r, client_id=0,
                          batch_size=4, local_steps=3, local_epochs=None, optimizer=opt,
                          lr=0.05)
        images = torch.cat([s.images for s in res.steps])
        labels = torch.cat([s.labels for s in res.steps])
        task.model.eval()
        params = {k: glob[k] for k, _ in task.model.named_parameters()}
        buffers = {k: glob[k] for k, _ in task.model.named_buffers()}
        delta, _ = unrolled_delta(task, params, buffers, images, labels, 0.05, 3, 4,
                                  optimizer=opt)
        for name in params:
            torch.testing.assert_close(params[name] + delta[name], res.update[name],
                                       rtol=1e-5, atol=1e-6)
        task.model.load_state_dict(res.update)  # round 2 starts from round 1's model


def test_adam_unroll_is_differentiable_in_the_images(one_thread):
    task = _task()
    x, y = _data(4)
    params, buffers = module_tensors(task.model)
    params = {k: v.detach().double() for k, v in params.items()}
    task.model.double()
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).double()

    def objective(images):
        delta, _ = unrolled_delta(task, params, buffers, images, y, 0.05, 3, 2,
                                  optimizer=LocalOptimizer("adam"))
        return sum((d * d).sum() for d in delta.values())

    xi = x.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(xi), xi)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    h = 1e-6
    fd = (objective(x.double() + h * direction) - objective(x.double() - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=1e-3, atol=1e-9)


def _delta_record(opt: LocalOptimizer, steps: int = 3):
    from attack_cases import fedavg_delta_record
    task = _task()
    x, y = _data(4)
    rec = fedavg_delta_record(task, make_spec("lenet", {}, image_size=16), x, y, lr=0.1,
                              steps=steps, batch_size=2)
    from fl_sim.cases import rerecord
    from fl_sim.records import TruthStep
    rows = [[(2 * k + j) % 4 for j in range(2)] for k in range(steps)]  # the record's batches
    return rerecord(rec, rec.update, optimizer=opt,  # what the record states, via the view
                    steps=[TruthStep(k, x[r], y[r], torch.tensor(r)) for k, r in enumerate(rows)])


def test_reading_a_delta_as_a_gradient_follows_the_optimiser():
    """Momentum mu: step j's gradient enters with weight (1 - mu^(S-j)) / (1 - mu); for mu =
    0.5 and S = 3 they sum to 1.75 + 1.5 + 1 = 4.25 (plain SGD: 3)."""
    from attacks.components.gradients import delta_scale
    assert delta_scale(_delta_record(LocalOptimizer("sgd"))) == pytest.approx(-1 / (0.1 * 3))
    assert delta_scale(_delta_record(LocalOptimizer("sgd", momentum=0.5))) == pytest.approx(
        -1 / (0.1 * 4.25))


def test_attacks_that_cannot_model_adam_refuse_in_one_line():
    from attacks.dlg import DLG
    from fl_sim.errors import ConfigError
    rec = _delta_record(LocalOptimizer("adam"))
    with pytest.raises(ConfigError, match="trained with Adam") as err:
        DLG(max_iterations=1)(rec, generator=torch.Generator().manual_seed(0))
    assert "\n" not in str(err.value)


@pytest.mark.slow  # ~11 s: the UNet's unrolled steps, twice
def test_gidm_unroll_reproduces_an_adam_trained_diffusion_client(one_thread):
    """The diffusion side (attacks.components.diffusion_matching.diffusion_update, GIDM's
    unrolling):
    local_train of the tiny digits UNet with Adam, 2 steps of batch 2 with the eps/t it drew,
    is reproduced from a fresh Adam state: relative L2 error 9.9e-5, 99.997 % of the
    coordinates within 1e-6 (Adam normalises each coordinate, so the float32 rounding of a
    near-zero gradient becomes a visible step in a few), while the same steps modelled as
    plain SGD have cosine 0.327 with the client's delta (all measured 2026-12-07)."""
    from diffusion_cases import digits_victims, global_task

    from attacks.components.diffusion_matching import diffusion_update
    task, _ = global_task(None)
    glob = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    x = digits_victims(4)
    opt = LocalOptimizer("adam", weight_decay=1e-4)
    res = local_train(task, x, torch.zeros(4, dtype=torch.int64), torch.arange(4), seed=0,
                      server_round=1, client_id=0, batch_size=2, local_steps=2,
                      local_epochs=None, optimizer=opt, lr=1e-3)
    images = torch.cat([s.images for s in res.steps])
    aux = {k: torch.cat([s.aux[k] for s in res.steps]) for k in ("eps", "t")}
    task.model.eval()
    params = {k: glob[k] for k, _ in task.model.named_parameters()}
    buffers = {k: glob[k] for k, _ in task.model.named_buffers()}
    delta = diffusion_update(task, params, buffers, images, aux, unroll=(1e-3, 2, 2),
                             optimizer=opt)
    true = torch.cat([(res.update[k] - params[k]).flatten() for k in params])
    got = torch.cat([delta[k].detach().flatten() for k in params])
    sgd = diffusion_update(task, params, buffers, images, aux, unroll=(1e-3, 2, 2))
    as_sgd = torch.cat([sgd[k].detach().flatten() for k in params])
    rel = float((got - true).norm() / true.norm())
    exact = float(((got - true).abs() < 1e-6).double().mean())
    cos_sgd = float(torch.nn.functional.cosine_similarity(as_sgd, true, dim=0))
    # measured: rel 9.9e-5, 99.997 % of coordinates within 1e-6, SGD-model cosine 0.327
    assert rel < 1e-3 and exact > 0.999, (rel, exact)
    assert cos_sgd < 0.6, cos_sgd  # modelling Adam as SGD would miss the delta


def test_idlg_reads_the_signs_an_adam_delta_keeps_and_counts_refuse(one_thread):
    """iDLG on one image's Adam delta (3 local steps, lr 1e-3; images 0-7, the first eight):
    the label is recovered from the signs for 8/8 (measured 8/8); batch counts refuse."""
    from attacks.components.label_recovery import recover_labels
    from fl_sim.cases import server_record
    from fl_sim.errors import ConfigError
    spec = make_spec("lenet", {}, image_size=16)
    x, y = _data(8)
    opt = LocalOptimizer("adam")
    hits = 0
    for i in range(8):
        task = _task()
        glob = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        res = local_train(task, x[i:i + 1], y[i:i + 1], torch.tensor([i]), seed=0,
                          server_round=1, client_id=0, batch_size=1, local_steps=3,
                          local_epochs=None, optimizer=opt, lr=1e-3)
        rec = server_record({k: res.update[k] - glob[k] for k in glob}, spec=spec,
                            global_params=glob, update_kind="delta", steps=res.steps,
                            num_examples=1, local_steps=3, lr=1e-3, batch_size=1,
                            optimizer=opt)  # through a run directory and the server view
        hits += int(recover_labels(rec, "idlg")[0]) == int(y[i])
    assert hits == 8
    with pytest.raises(ConfigError, match="magnitudes"):
        recover_labels(rec, "batch", 2)


def test_views_read_the_rows_optimiser_or_fall_back_to_the_config(tmp_path):
    """A server_in row with the optimiser the tap writes gives it; a row from before the
    field existed gets the view's fallback (Run.view passes the config's); a malformed one is
    a one-line RunDirError."""
    from fl_sim.errors import RunDirError
    from fl_sim.stores import ObservationStore, TruthStore
    from fl_sim.views import ServerView
    task = _task()
    state = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    store = ObservationStore(tmp_path)
    store.write_global(1, state)
    meta = {"update_kind": "delta", "num_examples": 2, "local_steps": 2, "lr": 0.1,
            "batch_size": 1, "defenses": []}
    momentum = LocalOptimizer("sgd", momentum=0.9, weight_decay=1e-4)
    zero = {k: torch.zeros_like(v) for k, v in state.items()}
    store.write_update("server_in", 1, 0, zero, {**meta, "optimizer": momentum.to_json()})
    store.write_update("server_in", 1, 1, zero, meta)  # written before the field existed
    store.write_update("server_in", 1, 2, zero, {**meta, "optimizer": {"betas": [0.9]}})
    spec = make_spec("lenet", {}, image_size=16)
    view = ServerView("t", spec, store, TruthStore(tmp_path), optimizer=LocalOptimizer("adam"))
    assert view.record(1, 0).optimizer == momentum
    assert view.record(1, 1).optimizer == LocalOptimizer("adam")
    assert ServerView("t", spec, store, TruthStore(tmp_path)).record(1, 1).optimizer == \
        LocalOptimizer("sgd")
    with pytest.raises(RunDirError, match="invalid optimizer") as err:
        view.record(1, 2)
    assert "\n" not in str(err.value)
