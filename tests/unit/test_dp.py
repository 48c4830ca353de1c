"""DP-SGD and local DP: accounting equals Opacus', clipping bounds hold, noise is seeded, bad
params fail before training, and the noise DLG calls safe stops Inverting Gradients.

The attack test uses the reference ConvNet case (FACTS.md: ConvNet-64, BatchNorm in eval mode
with fresh statistics, CIFAR-10 test image 0, batch 1, FedSGD, labels given). Its
"random-start PSNR" is the PSNR against the true image of the attack's own initial guess:
Inverting Gradients starts from ``torch.randn`` clamped to [0, 1] (attacks/components/inversion.py)
— the test draws that start with the attack's seed and scores it, so "within 2 dB of the random
start" means the attack learned (almost) nothing from the noisy gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from attack_cases import cifar_images, cifar_labels, make_record, make_task, torch_threads
from opacus.accountants import PRVAccountant, RDPAccountant

from defenses.accounting import compose, epsilon, gaussian_epsilon
from defenses.dp_sgd import DPSGD, clip_per_sample, per_sample_gradients, per_sample_norms
from defenses.local_dp import LocalDP, clip_update, update_norm
from fl_sim.cases import with_update
from fl_sim.config import from_dict
from fl_sim.errors import ConfigError
from fl_sim.registry import DEFENSES
from fl_sim.tasks.base import Batch

# -- accounting ----------------------------------------------------------------------------


def _opacus(acc_cls: type, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = acc_cls()
    for _ in range(steps):  # Opacus' own step(), as a DP optimizer calls it
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize("sigma,q,steps,delta", [
    (1.0, 0.01, 100, 1e-5), (0.7, 0.05, 40, 1e-6), (2.0, 0.25, 12, 1e-5), (1.1, 1.0, 1, 1e-5)])
def test_epsilon_equals_opacus_rdp(sigma: float, q: float, steps: int, delta: float) -> None:
    assert epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(
        _opacus(RDPAccountant, sigma, q, steps, delta), rel=1e-12)


@pytest.mark.parametrize("sigma,q,steps,delta", [(1.0, 0.01, 100, 1e-5), (2.0, 0.25, 12, 1e-5)])
def test_epsilon_equals_opacus_prv(sigma: float, q: float, steps: int, delta: float) -> None:
    ours = epsilon(sigma, q, steps, delta, "prv")
    assert ours == pytest.approx(_opacus(PRVAccountant, sigma, q, steps, delta), rel=1e-9)
    assert ours < epsilon(sigma, q, steps, delta, "rdp")  # PRV is the tighter bound


def test_epsilon_edge_cases_and_composition() -> None:
    assert epsilon(0.0, 0.1, 5) == math.inf and epsilon(1.0, 0.1, 0) == 0.0
    # composition over rounds with equal parameters = one history of all their steps
    assert compose([(1.0, 0.1, 3), (1.0, 0.1, 4)]) == pytest.approx(epsilon(1.0, 0.1, 7))
    # more noise, fewer steps, smaller q: less ε
    assert epsilon(2.0, 0.1, 10) < epsilon(1.0, 0.1, 10) < epsilon(1.0, 0.1, 20)
    assert epsilon(1.0, 0.05, 10) < epsilon(1.0, 0.1, 10)
    # local DP's Gaussian mechanism: q = 1, one release per round
    assert gaussian_epsilon(1.0, 1e-5, "rdp", 3) == pytest.approx(
        _opacus(RDPAccountant, 1.0, 1.0, 3, 1e-5))
    with pytest.raises(ValueError, match="noise_multiplier"):
        epsilon(-1.0, 0.1, 1)
    with pytest.raises(ValueError, match="accountant"):
        epsilon(1.0, 0.1, 1, accountant="gdp")


def test_defense_round_epsilon() -> None:
    d = DPSGD(noise_multiplier=1.2, delta=1e-6, accountant="prv")
    assert d.round_epsilon(batch_size=8, partition_size=200, steps=5, rounds=3) == \
        pytest.approx(_opacus(PRVAccountant, 1.2, 8 / 200, 15, 1e-6), rel=1e-9)
    # local DP is replace-one (sensitivity 2C): the accountant runs on σ / 2
    assert LocalDP(noise_multiplier=3.0).round_epsilon(rounds=2) == pytest.approx(
        _opacus(RDPAccountant, 1.5, 1.0, 2, 1e-5))


# -- clipping (seeded property tests) ------------------------------------------------------


def _random_update(g: torch.Generator, batch: int | None = None) -> dict[str, torch.Tensor]:
    lead = () if batch is None else (batch,)
    shapes = [(int(torch.randint(1, 6, (1,), generator=g)), 3), (7,), (2, 2, 3)]
    scale = float(10 ** torch.empty(1).uniform_(-4, 3, generator=g))
    return {f"p{i}": scale * torch.randn(*lead, *s, generator=g) for i, s in enumerate(shapes)}


def test_local_dp_clip_bound_over_random_updates() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        u = _random_update(g)
        c = float(10 ** torch.empty(1).uniform_(-3, 2, generator=g))
        clipped = clip_update(u, c)
        n, nc = update_norm(u), update_norm(clipped)
        assert nc <= c * (1 + 1e-5)
        if n <= c:  # an update within the bound passes unchanged
            assert all(torch.equal(clipped[k], u[k]) for k in u)
        else:  # else only its length changes
            assert nc == pytest.approx(c, rel=1e-5)
            cos = sum(float((clipped[k] * u[k]).sum()) for k in u) / (n * nc)
            assert cos == pytest.approx(1.0, abs=1e-5)


def test_dp_sgd_per_sample_clip_bound_over_random_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        b = int(torch.randint(1, 9, (1,), generator=g))
        grads = _random_update(g, batch=b)
        c = float(10 ** torch.empty(1).uniform_(-3, 2, generator=g))
        norms = per_sample_norms(clip_per_sample(grads, c))
        assert norms.shape == (b,) and bool((norms <= c * (1 + 1e-5)).all())
        before = per_sample_norms(grads)
        kept = before <= c
        assert torch.allclose(norms[kept], before[kept])


def test_per_sample_gradients_match_single_example_gradients() -> None:
    task, _ = make_task("lenet", {"activation": "relu"}, seed=0)
    x, y = cifar_images(3), cifar_labels(3)
    grads, losses = per_sample_gradients(task, Batch(x, y), {})
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    for i in range(3):
        one = torch.func.grad(lambda p, i=i: task.loss(p, {}, Batch(x[i:i + 1], y[i:i + 1]),
                                                       {}))(params)
        for k in one:
            torch.testing.assert_close(grads[k][i], one[k], rtol=1e-4, atol=1e-6)
    assert losses.shape == (3,)


def test_private_gradient_is_clipped_mean_plus_seeded_noise() -> None:
    task, _ = make_task("lenet", {"activation": "relu"}, seed=0)
    x, y = cifar_images(4), cifar_labels(4)
    d = DPSGD(noise_multiplier=0.0, max_grad_norm=1e-2)
    _, clean = d.private_gradient(task, Batch(x, y), {}, torch.Generator().manual_seed(0))
    assert update_norm(clean) <= 1e-2 * (1 + 1e-5)  # mean of 4 vectors of norm <= C
    noisy = DPSGD(noise_multiplier=2.0, max_grad_norm=1e-2)
    _, a = noisy.private_gradient(task, Batch(x, y), {}, torch.Generator().manual_seed(5))
    _, b = noisy.private_gradient(task, Batch(x, y), {}, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same generator seed, same noise
    resid = torch.cat([(a[k] - clean[k]).reshape(-1) for k in a]) * 4  # = sigma*C*N(0,1)
    assert float(resid.std()) == pytest.approx(2.0 * 1e-2, rel=0.02)


def test_local_dp_noise_std_and_seeding() -> None:
    from defenses.base import UpdateContext

    def ctx(seed: int) -> UpdateContext:
        return UpdateContext(kind="gradient", global_state={}, task=None, steps=(), lr=0.1,
                             num_examples=1, server_round=1, client_id=0,
                             generator=torch.Generator().manual_seed(seed))
    u = {"w": torch.full((200, 100), 1.0)}  # norm 141.4 -> clipped to C = 0.5
    d = LocalDP(clipping_norm=0.5, noise_multiplier=0.8)
    out, again = d.apply(u, ctx(3)), d.apply(u, ctx(3))
    assert torch.equal(out["w"], again["w"]) and out["w"].dtype == torch.float32
    noise = out["w"] - clip_update(u, 0.5)["w"]
    assert float(noise.std()) == pytest.approx(0.8 * 0.5, rel=0.02)
    assert update_norm(LocalDP(clipping_norm=0.5, noise_multiplier=0.0).apply(u, ctx(0))) == \
        pytest.approx(0.5, rel=1e-5)


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,field", [
    ("dp_sgd", {"noise_multiplier": -1.0}, "noise_multiplier"),
    ("dp_sgd", {"max_grad_norm": 0.0}, "max_grad_norm"),
    ("dp_sgd", {"accountant": "gdp"}, "accountant"),
    ("local_dp", {"noise_multiplier": -0.5}, "noise_multiplier"),
    ("local_dp", {"delta": 1.5}, "delta")])
def test_bad_params_are_one_config_line(name: str, params: dict, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        DEFENSES.create(name, _where="defenses[0]", **params)
    msg = str(exc.value)
    assert f"defenses[0].{field}" in msg and "\n" not in msg


def test_defaults_are_documented_values() -> None:
    assert DEFENSES.create("dp_sgd").describe() == {
        "name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5,
        "accountant": "rdp"}
    assert DEFENSES.create("local_dp").describe() == {
        "name": "local_dp", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
        "accountant": "rdp"}


def test_dp_sgd_rejects_batchnorm_models_before_training() -> None:
    from fl_sim.defended import check_defenses
    base = {"data": {"name": "digits", "image_size": 32}, "defenses": [{"name": "dp_sgd"}]}
    with pytest.raises(ConfigError, match="BatchNorm") as exc:
        check_defenses(from_dict({**base, "model": {"name": "convnet"}}))
    assert "\n" not in str(exc.value)
    check_defenses(from_dict({**base, "model": {"name": "mlp"}}))  # no BatchNorm: fine


# -- local training ------------------------------------------------------------------------


def test_local_train_with_dp_is_seeded_and_clipped() -> None:
    from fl_sim.federation.local import local_train, one_gradient
    task, _ = make_task("mlp", {"hidden": [32]}, seed=0, train=True)
    x, y, idx = cifar_images(8), cifar_labels(8), torch.arange(8)
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    kw = dict(seed=0, server_round=2, client_id=1, batch_size=4, local_steps=2,
              local_epochs=None, optimizer="sgd", lr=0.5)
    d = DPSGD(noise_multiplier=0.0, max_grad_norm=1e-3)
    res = [local_train(task, x, y, idx, dp=d, **kw),
           task.model.load_state_dict(start), local_train(task, x, y, idx, dp=d, **kw)]
    task.model.load_state_dict(start)
    delta = {k: res[0].update[k] - start[k] for k in start}
    assert all(torch.equal(res[0].update[k], res[2].update[k]) for k in start)
    # two SGD steps of lr 0.5 on gradients of norm <= C: the delta is at most 2*0.5*C
    assert update_norm(delta) <= 2 * 0.5 * 1e-3 * (1 + 1e-4)
    plain = local_train(task, x, y, idx, **kw)
    task.model.load_state_dict(start)
    assert update_norm({k: plain.update[k] - start[k] for k in start}) > 100 * update_norm(delta)
    g = one_gradient(task, x, y, idx, seed=0, server_round=2, client_id=1, batch_size=4,
                     dp=DPSGD(noise_multiplier=1.0, max_grad_norm=1e-3))
    g2 = one_gradient(task, x, y, idx, seed=0, server_round=2, client_id=1, batch_size=4,
                      dp=DPSGD(noise_multiplier=1.0, max_grad_norm=1e-3))
    assert all(torch.equal(g.update[k], g2.update[k]) for k in g.update)
    assert set(g.update) == {k for k, _ in task.model.named_parameters()}


def test_config_params_reach_the_defense() -> None:
    """``[[defenses]] name = "local_dp"`` + keys beside the name are the defense's params."""
    from fl_sim.defended import build_defenses, defenses_in_force
    cfg = from_dict({"defenses": [{"name": "local_dp", "noise_multiplier": 2.5,
                                   "clipping_norm": 0.1},
                                  {"name": "dp_sgd", "accountant": "prv"}]})
    local, sgd = build_defenses(cfg)
    assert (local.noise_multiplier, local.clipping_norm, sgd.accountant) == (2.5, 0.1, "prv")
    assert defenses_in_force(cfg)[0] == {"name": "local_dp", "clipping_norm": 0.1,
                                         "noise_multiplier": 2.5, "delta": 1e-5,
                                         "accountant": "rdp"}


def test_cli_negative_sigma_is_one_line_before_anything_starts(tmp_path, capsys) -> None:
    from fl_sim import cli
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[model]\nname = "mlp"\n[[defenses]]\nname = "dp_sgd"\n'
                   'noise_multiplier = -1\n')
    code = cli.main(["run", str(cfg), "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("fl-sim: error: ")
    assert "defenses[0].noise_multiplier" in err and not (tmp_path / "r").exists()


# -- the noise where published attacks fail (reference ConvNet case) -----------------------

#: DLG (Zhu et al. 2019, Sec. 6): no leakage once Gaussian noise of variance >= 1e-2 is added
#: to the gradient. With DP-SGD at batch 1 the reply is clip(g, C) + N(0, σ²C²), so the same
#: per-coordinate variance is σ = sqrt(1e-2) / C; at the default C = 1: σ = 0.1.
DLG_NOISE_VARIANCE = 1e-2
IG_ITERATIONS = 40  # CI budget; benchmarks/dp_attacks.py measures 200
#: bars of the test below (measured values and margins: tests/QUALITY_MARGINS.md)
MIN_ATTACK_GAIN_DB = 3.0  # undefended PSNR over the random start
CLIP_ONLY_TOLERANCE_DB = 0.1  # |clipping only - undefended|
MAX_NOISY_OVER_START_DB = 2.0  # noisy PSNR over the random start
MIN_NOISE_DROP_DB = 3.0  # undefended - noisy


@pytest.mark.slow
def test_dlg_noise_stops_inverting_gradients_and_zero_noise_does_not() -> None:
    """ConvNet-64 (BatchNorm in eval mode: per-example), CIFAR test image 0, batch 1, labels
    granted, IG without TV (a TV prior alone lifts PSNR above the random start by smoothing
    it, so it would blur what the gradient gave away). Random-start PSNR: the attack's own
    initial guess (restart 0: ``randn`` with the attack's seed, clamped to [0, 1]) against
    the truth. Measured (seed 0, 40 iterations): random start 10.40 dB, undefended 14.61 dB,
    σ = 0 (clipping only) 14.61 dB, σ = 0.1 at C = 1 9.43 dB."""

    from attacks.components.objectives import NormalisedImages
    from attacks.inverting_gradients import InvertingGradients
    from fl_sim.metrics import psnr, score_reconstruction

    c = 1.0
    sigma = DLG_NOISE_VARIANCE ** 0.5 / c
    with torch_threads(1):
        task, spec = make_task("convnet")
        x, y = cifar_images(1), cifar_labels(1)
        rec = make_record(task, spec, x, y, knowledge={"labels": y})
        start = NormalisedImages((1, *x.shape), spec.mean, spec.std,
                                 generator=torch.Generator().manual_seed(0))
        start.clamp_()
        random_start = float(psnr(start.images()[0].detach(), x).mean())

        def attack(update: dict[str, torch.Tensor]) -> float:
            out = InvertingGradients(max_iterations=IG_ITERATIONS, labels="granted",
                                     tv_weight=0.0)(with_update(rec, update, x, y),
                                                    generator=torch.Generator().manual_seed(0))
            # the start the attack reports (the runner's start_psnr) is its own random start
            assert torch.equal(out.extras["start_images"], start.images()[0].detach())
            return score_reconstruction(out.images, x)["psnr"]

        def defended(noise: float) -> dict[str, torch.Tensor]:
            d = DPSGD(noise_multiplier=noise, max_grad_norm=c)
            return d.private_gradient(task, Batch(x, y), {}, torch.Generator().manual_seed(0))[1]

        undefended, clip_only, noisy = attack(rec.update), attack(defended(0.0)), \
            attack(defended(sigma))
    assert undefended - random_start >= MIN_ATTACK_GAIN_DB  # the attack works on this budget
    # IG's cosine ignores the scale
    assert abs(clip_only - undefended) <= CLIP_ONLY_TOLERANCE_DB, (clip_only, undefended)
    # "within 2 dB of the random start" read as "no better than it + 2 dB": fitting pure noise
    # can also drift BELOW the start (7.8 dB at 200 iterations, benchmarks/dp_attacks.py),
    # which is no leakage either; at this budget it is within 2 dB both ways
    assert noisy - random_start <= MAX_NOISY_OVER_START_DB, (noisy, random_start, undefended)
    assert undefended - noisy > MIN_NOISE_DROP_DB, (noisy, undefended)


def test_local_dp_on_one_image_gradient_is_dp_sgd_at_batch_1() -> None:
    """At batch 1 (the attack case above) local DP on the FedSGD gradient and DP-SGD are the
    same mechanism with the same noise draws, so the attack figures above hold for both."""
    from defenses.base import UpdateContext
    task, spec = make_task("lenet", {"activation": "relu"}, seed=0)
    x, y = cifar_images(1), cifar_labels(1)
    raw = make_record(task, spec, x, y).update
    ctx = UpdateContext(kind="gradient", global_state={}, task=task, steps=(), lr=0.1,
                        num_examples=1, server_round=1, client_id=0,
                        generator=torch.Generator().manual_seed(3))
    local = LocalDP(clipping_norm=0.5, noise_multiplier=0.3).apply(raw, ctx)
    _, sgd = DPSGD(noise_multiplier=0.3, max_grad_norm=0.5).private_gradient(
        task, Batch(x, y), {}, torch.Generator().manual_seed(3))
    for k in raw:
        torch.testing.assert_close(local[k], sgd[k], rtol=1e-4, atol=1e-6)


def test_client_epsilon_composes_over_the_rounds_the_client_was_sampled_in() -> None:
    """The reply's cumulative ε counts exactly the rounds the server's seeded sampling picked
    the client in (fraction 0.3 of 10 clients); max over clients in the metrics row."""
    from fl_sim.federation.dp_epsilon import client_epsilons, epsilon_row
    from fl_sim.federation.taps import sample_clients
    cfg = from_dict({"federation": {"num_clients": 10, "fraction_train": 0.3, "batch_size": 5,
                                    "local_steps": 2},
                     "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.5}]})
    picked = [r for r in range(1, 13) if 4 in sample_clients(0, r, list(range(10)), 0.3)]
    assert 0 < len(picked) < 12
    last = picked[-1]
    eps = client_epsilons(cfg, 4, last, partition_size=50, steps=2)
    assert eps["dp-epsilon-round"] == pytest.approx(_opacus(RDPAccountant, 1.5, 0.1, 2, 1e-5))
    assert eps["dp-epsilon"] == pytest.approx(
        _opacus(RDPAccountant, 1.5, 0.1, 2 * len(picked), 1e-5))
    assert epsilon_row({4: (eps["dp-epsilon-round"], eps["dp-epsilon"]), 7: (0.1, 0.2)}) == {
        "dp_epsilon_round": eps["dp-epsilon-round"], "dp_epsilon": eps["dp-epsilon"]}
    assert client_epsilons(from_dict({}), 0, 1, partition_size=5, steps=1) == {}


@pytest.mark.slow  # imports diffusers and builds the UNet
def test_per_sample_gradients_slice_the_diffusion_aux() -> None:
    """Diffusion: each example's gradient uses ITS eps and t (tiny UNet, GroupNorm)."""
    from diffusion_cases import digits_victims, draw_aux, global_task
    task, _ = global_task(seed=0)
    task.model.eval()  # no dropout: the reference gradient below must see the same network
    x, aux = digits_victims(2), draw_aux(2, t=[10, 900])
    y = torch.zeros(2, dtype=torch.int64)
    grads, _ = per_sample_gradients(task, Batch(x, y), aux)
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    buffers = {k: v.detach() for k, v in task.model.named_buffers()}
    one = torch.func.grad(lambda p: task.loss(p, buffers, Batch(x[1:], y[1:]),
                                              {k: v[1:] for k, v in aux.items()}))(params)
    for k in one:
        torch.testing.assert_close(grads[k][1], one[k], rtol=1e-3, atol=1e-6)
