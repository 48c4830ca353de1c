"""GIDM+ with eps solved from the output layer (issue 25) vs today's GIDM+ vs GIDM (eps, t granted).

Cases (:mod:`fl_sim.cases`): the tests' digits prior (tiny UNet, T = 1000) is the
global model; victims are digits of the TEST split from index ``--start`` (default 40: no test
uses digits past 10), FedSGD gradient of the mean DDPM loss; eps and t drawn by ``draw_aux``
with seed ``1000 + batch`` (uniform: ``2000 + batch``) in three t ranges: low [0, 200),
high [700, 1000), uniform [0, T).
Attacks:

- ``gidm_plus``: today's faithful GIDM+ (t sweep + relaxation, eps from a fresh draw);
- ``gidm_plus_solve``: the same, then ``eps_solve="last_layer"`` (t rounded, L-BFGS over x_t
  with eps solved from ``conv_out``'s gradient);
- ``gidm``: GIDM with eps and t GRANTED (the upper reference).

``--basin``: instead, the oracle basin of the search over x_t (not an attack): digit
``--start``, t in {50, 800}, L-BFGS over x_t from ``x_t_true + rho |x_t| u`` (u a seeded unit
direction, rho in {0.5, 1.0}) with eps solved, and the same L-BFGS with the TRUE eps.

Per case: |t - t_true| (mean), eps relative error ``|eps_hat - eps| / |eps|`` (matched
images), PSNR / SSIM, CPU seconds (``time.process_time``, one thread: robust to other load).
Budgets are chosen so that the three take similar CPU time (``--budget`` scales all).

    .venv/bin/python benchmarks/gidm_plus_solve.py --prior DIR [--batches 1,4]
        [--ranges low,high,uniform] [--budget 1.0] [--out benchmarks/out/gidm_plus_solve.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from attacks.gidm import GIDM
from attacks.gidm_plus import GIDMPlus
from fl_sim.attack_runner import score_diffusion_aux
from fl_sim.cases import (
    diffusion_record,
    digits_victims,
    draw_aux,
    global_task,
    train_digits_prior,
)
from fl_sim.metrics import score_reconstruction
from fl_sim.records import GroundTruthRecord, TruthStep

ROOT = Path(__file__).resolve().parents[1]

RANGES = {"low": (0, 200), "high": (700, 1000), "uniform": (0, 1000)}
#: eps / t seed = SEEDS[range] + batch (uniform: 1000 + 1 drew the same t = 12 as low)
SEEDS = {"low": 1000, "high": 1000, "uniform": 2000}


def attacks(budget: float) -> dict[str, Any]:
    """The compared attacks at ``budget`` x the default iteration counts."""
    n = lambda k: max(1, int(round(k * budget)))  # noqa: E731
    plus = dict(phase1_iterations=n(30), phase2_iterations=n(20), sampler_steps=5,
                t_candidates=2, sweep_iterations=4)
    return {
        "gidm_plus": lambda: GIDMPlus(**{**plus, "phase1_iterations": n(60),
                                         "phase2_iterations": n(40)}),
        "gidm_plus_solve": lambda: GIDMPlus(**plus, eps_solve="last_layer",
                                            solve_iterations=n(60)),
        "gidm": lambda: GIDM(phase1_iterations=n(40), phase2_iterations=n(60),
                             sampler_steps=5),
    }


def run_case(task: Any, spec: Any, name: str, make: Any, images: torch.Tensor,
             aux: dict[str, torch.Tensor]) -> dict[str, Any]:
    attack = make()
    record = diffusion_record(task, spec, images, aux=aux,
                              grant=bool(attack.required_knowledge()))
    t0 = time.process_time()
    recon = attack(record, generator=torch.Generator().manual_seed(0))
    cpu = time.process_time() - t0
    s = score_reconstruction(recon.images, images)
    out = {"attack": name, "psnr": s["psnr"], "ssim": s["ssim"],
           "psnr_per_image": s["psnr_per_image"], "cpu_s": cpu}
    if "t" in recon.extras:
        truth = GroundTruthRecord("bench", 1, 0, (TruthStep(
            0, images, torch.zeros(len(images), dtype=torch.long),
            torch.arange(len(images)), aux),))
        sc = score_diffusion_aux(recon.extras, truth, s)
        out.update(t_abs_error_mean=sc["t_abs_error_mean"], eps_rel_error=sc["eps_rel_error"])
        out["solve_kept"] = recon.extras.get("solve_kept")
    return out


def _granted_distance(task: Any, problem: Any, x: torch.Tensor, t: torch.Tensor,
                      eps: torch.Tensor) -> torch.Tensor:
    """Matching distance of ``x_t`` with the TRUE eps (GIDM's objective in x_t units)."""
    import torch.nn.functional as F

    from attacks.components.relaxed_diffusion import matching_distance

    g = torch.func.grad(lambda p: F.mse_loss(task.predict(p, problem.buffers, x, t), eps))(
        dict(problem.params))
    return matching_distance({k: v[None] for k, v in g.items()}, problem.target,
                             problem.target_sq)[0]


def _lbfgs_granted(task: Any, problem: Any, start: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, iterations: int) -> torch.Tensor:
    """The same L-BFGS as ``search_xt``, over x_t with the TRUE eps."""
    var = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([var], max_iter=iterations, history_size=100, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        d = _granted_distance(task, problem, var, t, eps)
        d.backward()
        return d
    opt.step(closure)
    return var.detach()


def basin(task: Any, spec: Any, start: int, iterations: int) -> list[dict[str, Any]]:
    """The oracle basin (module docstring): solved vs granted eps from perturbed x_t."""
    from attacks.components.noise_solve import search_xt, x0_from
    from attacks.gidm_plus import abar_at, problem_from_record
    from fl_sim.metrics import psnr

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    rows = []
    for tt in (50, 800):
        images, aux = digits_victims(1, start=start), draw_aux(1, seed=500, t=[tt])
        problem = problem_from_record(diffusion_record(task, spec, images, aux=aux,
                                                       grant=False))
        t = aux["t"].float()
        ab = abar_at(task.alphas_cumprod, t).view(-1, 1, 1, 1)
        x_t = ab.sqrt() * (images * 2 - 1) + (1 - ab).sqrt() * aux["eps"]

        def score(x0: torch.Tensor, images: torch.Tensor = images) -> float:
            return float(psnr(((x0 + 1) / 2).clamp(0, 1), images).mean())
        for rho in (0.5, 1.0):
            u = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
            x_start = x_t + rho * u * x_t.norm() / u.norm()
            got, eps, dist, _ = search_xt(problem, x_start, t, iterations=iterations)
            var = _lbfgs_granted(task, problem, x_start, t, aux["eps"], iterations)
            rows.append({"t": tt, "rho": rho, "solved": {
                "distance": dist, "xt_err": rel(got, x_t), "eps_err": rel(eps, aux["eps"]),
                "psnr": score(x0_from(problem, got, eps, t))}, "granted": {
                "distance": float(_granted_distance(task, problem, var, t, aux["eps"])),
                "xt_err": rel(var, x_t), "psnr": score(x0_from(problem, var, aux["eps"], t))}})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", type=Path, default=None)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--ranges", default="low,high,uniform")
    ap.add_argument("--attacks", default="gidm_plus,gidm_plus_solve,gidm")
    ap.add_argument("--start", type=int, default=40)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--basin", type=int, default=0, metavar="ITERATIONS",
                    help="run the oracle basin measurement with this many L-BFGS iterations")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" /
                    "gidm_plus_solve.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prior = args.prior or train_digits_prior(ROOT / "benchmarks" / "out" / "digits_prior")
    task, spec = global_task(prior)
    if args.basin:
        rows_b = basin(task, spec, args.start, args.basin)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"basin": rows_b, "prior": str(prior)}, indent=2))
        return
    made = attacks(args.budget)
    rows = []
    for b in (int(v) for v in args.batches.split(",")):
        for rng in args.ranges.split(","):
            images = digits_victims(b, start=args.start)
            aux = draw_aux(b, seed=SEEDS[rng] + b, t_range=RANGES[rng])
            for name in args.attacks.split(","):
                r = {"batch": b, "t_range": rng, "t_true": aux["t"].tolist(),
                     **run_case(task, spec, name, made[name], images, aux)}
                rows.append(r)
                print(f"b{b} {rng:7s} {name:16s} PSNR {r['psnr']:6.2f} SSIM {r['ssim']:.3f} "
                      f"t err {r.get('t_abs_error_mean', float('nan')):6.1f} eps err "
                      f"{r.get('eps_rel_error', float('nan')):.3g} cpu {r['cpu_s']:.0f} s "
                      f"kept {r.get('solve_kept')}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"budget": args.budget, "prior": str(prior),
                                    "start": args.start, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
