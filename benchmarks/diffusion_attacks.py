"""GIDM vs GIDM+ vs pixel-only on federated diffusion updates; GIDM+'s t search; GIDM's speed.

Cases (``fl_sim.cases``): the tiny-UNet DDPM trained by ``fl-sim train-prior`` on
the digits TRAIN split (grey 16x16; cached in ``benchmarks/out/digits_prior``) is the global
model; the victims are digits of the TEST split; the observed update is the FedSGD gradient of
the mean DDPM loss with seeded eps and t.

    .venv/bin/python benchmarks/diffusion_attacks.py [--threads 1] [--images 8]
        [--budget 1.0] [--sections quality,table,speed] [--batches 1,4,8] [--prior DIR]
        [--out benchmarks/out/diffusion_attacks.json]

Sections:

- ``quality`` (issue 8's GIDM+ bar): batch 1, ``--images`` images, t uniform on [0, T):
  GIDM+ (nothing granted) against pixel-only matching with eps and t GUESSED (a random eps,
  t = the midpoint: ``gidm_plus`` with ``t_search="fixed"``, ``learn_eps=False``, no latent
  phase); per image the true and recovered t, the eps error, both PSNRs.
- ``table``: batch {1, 4, 8} x t range (low noise t < 200, high noise t >= 700): GIDM (eps, t
  granted), GIDM+ (nothing granted) and pixel-only (eps, t granted: GIDM without phase 1):
  PSNR / SSIM / seconds.
- ``speed``: one GIDM phase-1 iteration with a K-step sampler against (K + 3) plain training
  steps (forward + backward of the DDPM loss) of the same UNet and batch; one phase-2
  iteration (Adam: one matching evaluation) against 3.0 plain steps; for every
  ``second_order`` (exact double backward, forward / central finite difference).
  Per-iteration CPU times (``time.process_time``, one thread: robust to other load) are
  differences between runs of ``2k`` and ``k`` iterations (set-up cancels); plain steps and
  attacks alternate.

``--budget`` scales every iteration count. Prints tables and writes
``benchmarks/out/diffusion_attacks.json``. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

from attacks.components.diffusion_matching import SECOND_ORDER  # noqa: E402
from attacks.gidm import GIDM  # noqa: E402
from attacks.gidm_plus import GIDMPlus  # noqa: E402
from fl_sim.attack_runner import score_diffusion_aux  # noqa: E402
from fl_sim.cases import (  # noqa: E402
    diffusion_record,
    digits_victims,
    draw_aux,
    global_task,
    train_digits_prior,
)
from fl_sim.metrics import score_reconstruction  # noqa: E402
from fl_sim.records import GroundTruthRecord, TruthStep  # noqa: E402
from fl_sim.tasks.base import Batch  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
T_RANGES = {"low": (0, 200), "high": (700, 1000)}
SAMPLER_STEPS = 5


def attacks(budget: float, second_order: str = "finite_difference") -> dict[str, Any]:
    """The compared attacks at ``budget`` x the default iteration counts; ``second_order`` for
    GIDM and pixel-only (GIDM+ optimises eps too: always the exact double backward)."""
    n = lambda k: max(1, int(round(k * budget)))  # noqa: E731
    return {
        "gidm": lambda: GIDM(phase1_iterations=n(60), phase2_iterations=n(40),
                             sampler_steps=SAMPLER_STEPS, second_order=second_order),
        "gidm_plus": lambda: GIDMPlus(phase1_iterations=n(60), phase2_iterations=n(40),
                                      sampler_steps=SAMPLER_STEPS, t_candidates=2,
                                      sweep_iterations=n(8)),
        "pixel_only": lambda: GIDM(phase1_iterations=0, phase2_iterations=n(100),
                                   second_order=second_order),
        "pixel_only_guessed": lambda: GIDMPlus(phase1_iterations=0, phase2_iterations=n(100),
                                               t_search="fixed", learn_eps=False, lr=0.05),
    }


def _score(recon: Any, images: torch.Tensor, aux: dict[str, torch.Tensor]) -> dict[str, Any]:
    s = score_reconstruction(recon.images, images)
    out = {"psnr": s["psnr"], "ssim": s["ssim"], "psnr_per_image": s["psnr_per_image"]}
    if "t" in recon.extras:
        truth = GroundTruthRecord("bench", 1, 0, (TruthStep(
            0, images, torch.zeros(len(images), dtype=torch.long),
            torch.arange(len(images)), aux),))
        out.update(score_diffusion_aux(recon.extras, truth, s))
    return out


def run_case(task: Any, spec: Any, make: Any, images: torch.Tensor,
             aux: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One attack on one FedSGD record; granted eps/t only for attacks that require them."""
    attack = make()
    record = diffusion_record(task, spec, images, aux=aux,
                              grant=bool(attack.required_knowledge()))
    t0 = time.perf_counter()
    recon = attack(record, generator=torch.Generator().manual_seed(0))
    return {**_score(recon, images, aux), "seconds": time.perf_counter() - t0}


def quality(task: Any, spec: Any, n_images: int, budget: float) -> dict[str, Any]:
    """GIDM+ vs pixel-only with eps/t guessed, batch 1, t uniform."""
    made = attacks(budget)
    rows = []
    for i in range(n_images):
        images, aux = digits_victims(1, start=i), draw_aux(1, seed=100 + i)
        plus = run_case(task, spec, made["gidm_plus"], images, aux)
        base = run_case(task, spec, made["pixel_only_guessed"], images, aux)
        rows.append({"image": i, "t_true": plus["t_true"][0], "t_recovered":
                     plus["t_recovered"][0], "t_abs_error": plus["t_abs_error"][0],
                     "eps_rel_error": plus["eps_rel_error"], "psnr_gidm_plus": plus["psnr"],
                     "psnr_pixel_guessed": base["psnr"], "seconds_gidm_plus": plus["seconds"],
                     "seconds_pixel_guessed": base["seconds"]})
        print(f"  image {i}: t {rows[-1]['t_true']:.0f} -> {rows[-1]['t_recovered']:.1f}  "
              f"eps err {plus['eps_rel_error']:.2f}  PSNR GIDM+ {plus['psnr']:.2f} / "
              f"pixel guessed {base['psnr']:.2f}  ({plus['seconds']:.0f} s / "
              f"{base['seconds']:.0f} s)", flush=True)
    tol = 0.1 * task.num_train_timesteps
    return {"rows": rows, "t_within_10pct": sum(r["t_abs_error"] <= tol for r in rows),
            "mean_psnr_gidm_plus": statistics.mean(r["psnr_gidm_plus"] for r in rows),
            "mean_psnr_pixel_guessed": statistics.mean(r["psnr_pixel_guessed"] for r in rows)}


def table(task: Any, spec: Any, budget: float, batches: list[int],
          second_order: str = "finite_difference") -> list[dict[str, Any]]:
    """GIDM / GIDM+ / pixel-only over batch size and t range."""
    made = attacks(budget, second_order)
    rows = []
    for b in batches:
        for rng_name, rng in T_RANGES.items():
            images, aux = digits_victims(b, start=20), draw_aux(b, seed=7, t_range=rng)
            for name in ("gidm", "gidm_plus", "pixel_only"):
                r = run_case(task, spec, made[name], images, aux)
                rows.append({"batch": b, "t_range": rng_name, "attack": name,
                             "psnr": r["psnr"], "ssim": r["ssim"], "seconds": r["seconds"],
                             "t_abs_error_mean": r.get("t_abs_error_mean")})
                print(f"  b{b} {rng_name:4s} {name:10s} PSNR {r['psnr']:6.2f}  SSIM "
                      f"{r['ssim']:.3f}  {r['seconds']:6.1f} s", flush=True)
    return rows


def _plain_step(task: Any, params: dict[str, torch.Tensor], batch: Batch,
                aux: dict[str, torch.Tensor], k: int) -> float:
    """CPU seconds of one forward + backward of the DDPM loss (mean of ``k``)."""
    t0 = time.process_time()
    for _ in range(k):
        task.model.zero_grad(set_to_none=True)
        task.loss(params, {}, batch, aux).backward()
    return (time.process_time() - t0) / k


def _per_iteration(make: Any, record: Any, k: int) -> float:
    """CPU seconds per iteration (process time: one thread, robust on a shared machine)."""
    def run(iters: int) -> float:
        t0 = time.process_time()
        make(iters)(record, generator=torch.Generator().manual_seed(0))
        return time.process_time() - t0
    return (run(2 * k) - run(k)) / k


def speed(task: Any, spec: Any, batches: list[int], repeats: int, k: int) -> list[dict]:
    """GIDM phase-1 / phase-2 iteration cost in plain training steps of the same UNet."""
    rows = []
    params = dict(task.model.named_parameters())
    for b in batches:
        images, aux = digits_victims(b), draw_aux(b, seed=1)
        record = diffusion_record(task, spec, images, aux=aux)
        batch = Batch(images, torch.zeros(b, dtype=torch.long))
        for mode in SECOND_ORDER:
            # phase 2 with Adam: exactly one matching evaluation per iteration
            p1 = lambda n, m=mode: GIDM(phase1_iterations=n, phase2_iterations=0,  # noqa: E731
                                        sampler_steps=SAMPLER_STEPS, second_order=m)
            p2 = lambda n, m=mode: GIDM(phase1_iterations=0, phase2_iterations=n,  # noqa: E731
                                        phase2_optimizer="adam", second_order=m)
            fb, ph1, ph2 = [], [], []
            for _ in range(repeats):
                fb.append(_plain_step(task, params, batch, aux, k))
                ph1.append(_per_iteration(p1, record, k))
                ph2.append(_per_iteration(p2, record, k))
                fb.append(_plain_step(task, params, batch, aux, k))
            f, a, c = (statistics.median(v) for v in (fb, ph1, ph2))
            rows.append({"batch": b, "second_order": mode, "sampler_steps": SAMPLER_STEPS,
                         "plain_step_s": f, "phase1_iteration_s": a, "phase2_iteration_s": c,
                         "phase1_ratio": a / f, "phase1_bound": SAMPLER_STEPS + 3,
                         "phase2_ratio": c / f, "phase2_bound": 3.0})
            print(f"  b{b} {mode:18s}: plain {f * 1e3:.1f} ms  phase 1 {a / f:.2f}x (bound "
                  f"{SAMPLER_STEPS + 3})  phase 2 {c / f:.2f}x (bound 3.0)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--sections", default="quality,table,speed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--second-order", default="finite_difference", choices=SECOND_ORDER,
                    help="GIDM's and pixel-only's image gradient in the table")
    ap.add_argument("--out", type=Path, default=OUT / "diffusion_attacks.json")
    ap.add_argument("--prior", type=Path, default=None,
                    help="an existing prior directory (with unet/) instead of training the "
                         "tests' digits prior into benchmarks/out/digits_prior")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    prior = args.prior or train_digits_prior(OUT / "digits_prior")
    task, spec = global_task(prior)
    out: dict[str, Any] = {"threads": args.threads, "budget": args.budget,
                           "second_order": args.second_order,
                           "sampler_steps": SAMPLER_STEPS, "prior": str(prior)}
    if "speed" in sections:
        print("speed (GIDM iteration / plain training step):")
        out["speed"] = speed(task, spec, batches[:2], args.repeats, 3)
    if "quality" in sections:
        print(f"quality (GIDM+ vs pixel-only with eps/t guessed, batch 1, {args.images} "
              "images):")
        out["quality"] = q = quality(task, spec, args.images, args.budget)
        print(f"  t within 10 %: {q['t_within_10pct']}/{args.images}; mean PSNR GIDM+ "
              f"{q['mean_psnr_gidm_plus']:.2f} dB vs {q['mean_psnr_pixel_guessed']:.2f} dB")
    if "table" in sections:
        print("table (PSNR / SSIM / seconds):")
        out["table"] = table(task, spec, args.budget, batches, args.second_order)
    out["total_seconds"] = time.perf_counter() - t0
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    # sections run separately accumulate in one file (each keeps its own settings)
    old = json.loads(path.read_text()) if path.is_file() else {}
    settings = {k: v for k, v in out.items() if k not in ("speed", "quality", "table")}
    old.update({k: {"settings": settings, "result": out[k]}
                for k in ("speed", "quality", "table") if k in out})
    path.write_text(json.dumps(old, indent=2))
    print(f"wrote {path} ({out['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
