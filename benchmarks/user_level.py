"""User-level inversion on Olivetti faces: identity accuracy and similarity of the recoveries.

Setting (issue 10, quality bullet "User-level on Olivetti faces"): ``../shared/data/
olivetti_faces.npz`` (40 people x 10 images, 64x64 grey), downscaled to ``--size`` (16:
CPU budget). Users ``0 .. users-1`` are attacked: each is one client (``by_identity``) whose
FedSGD gradient of an untrained LeNet (40 classes) on its first ``--batch`` images (7) is
observed. Their last ``10 - batch`` images are HELD OUT: with those of every other user they
train the identity classifier (``fl_sim.identity``). The diffusion prior is trained by
``fl-sim train-prior``'s function on the OTHER users only (``filter.groups`` = users
``users .. 39``), so it never saw an attacked person. Each client's update is attacked with
``user_level_diffusion``; ``identity_top1`` / ``sim_own`` / ``sim_others`` are computed as the
attack runner does. Chance top-1 = 1/40.

    .venv/bin/python benchmarks/user_level.py --users 10 --out benchmarks/out/user_level

Writes ``OUT/results.json`` (per user and summary) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OLIVETTI = ROOT.parent / "shared" / "data" / "olivetti_faces.npz"
NUM_PEOPLE = 40


def olivetti(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [400, 1, size, size] in [0, 1], identities [400])``; raises FileNotFoundError."""
    d = np.load(OLIVETTI)
    x = torch.from_numpy(d["x"]).permute(0, 3, 1, 2).float() / 255.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x, torch.from_numpy(d["y"]).long()


def user_images(x: torch.Tensor, y: torch.Tensor, user: int) -> torch.Tensor:
    return x[y == user]


def train_other_users_prior(out: Path, *, size: int, attacked: int, steps: int,
                            seed: int = 0) -> Path:
    """The prior trained (fl-sim train-prior) on users ``attacked .. 39`` only, all their
    images (``test_fraction`` tiny; split ``train``)."""
    from fl_sim.train_prior import train_prior

    cfg = {"data": {"name": "npz", "path": str(OLIVETTI), "groups_key": "y",
                    "image_size": size, "test_fraction": 0.05, "seed": seed},
           "filter": {"split": "train", "groups": list(range(attacked, NUM_PEOPLE))},
           "model": {"name": "unet", "preset": "tiny"},
           "task": {"name": "diffusion", "num_train_timesteps": 1000},
           "training": {"steps": steps, "batch_size": 16, "lr": 2e-3, "seed": seed,
                        "checkpoint_every": steps, "eval_examples": 16, "sample_images": 16,
                        "sample_steps": 10}}
    return Path(train_prior(cfg, out))


def train_identity_heldout(out: Path, x: torch.Tensor, y: torch.Tensor, *, batch: int,
                           epochs: int = 60, seed: int = 0) -> Path:
    """Identity classifier on every user's images ``batch ..`` (never in a client batch)."""
    from fl_sim.identity import train_identity

    keep = torch.cat([torch.nonzero(y == u).flatten()[batch:] for u in range(NUM_PEOPLE)])
    return train_identity(x[keep], y[keep], out, epochs=epochs, seed=seed,
                          metadata={"data": "olivetti held-out", "per_user": 10 - batch})


def user_record(images: torch.Tensor, label: int, *, seed: int = 0, model: str = "mlp",
                model_params: dict[str, Any] | None = None) -> Any:
    """A FedSGD record of an untrained ``model`` (40 classes) on one user's images."""
    from fl_sim.cases import server_record
    from fl_sim.records import ModelSpec, TruthStep
    from fl_sim.tasks.base import Batch

    spec = ModelSpec(model=model, model_params=dict(model_params or {}), task="classifier",
                     task_params={},
                     in_channels=1, num_classes=NUM_PEOPLE, image_size=images.shape[-1],
                     mean=(0.5,), std=(0.25,))
    from fl_sim.tasks import build_task
    task = build_task(spec, seed=seed)
    task.model.eval()
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    buffers = {k: v.detach() for k, v in task.model.named_buffers()}
    labels = torch.full((images.shape[0],), label, dtype=torch.int64)
    grads = torch.func.grad(lambda p: task.loss(p, buffers, Batch(images, labels), {}))(params)
    n = int(images.shape[0])
    return server_record(  # recorded, then read through the server view (nothing granted)
        {k: v.detach().clone() for k, v in grads.items()}, spec=spec,
        global_params={k: v.detach().clone() for k, v in task.model.state_dict().items()},
        update_kind="gradient", steps=[TruthStep(0, images, labels, torch.arange(n))],
        num_examples=n, local_steps=1, lr=0.0, batch_size=n, run_id="user_level",
        client=label)


def attack_users(users: list[int], x: torch.Tensor, y: torch.Tensor, *, prior: Path,
                 identity: Path, batch: int, attack_params: dict[str, Any],
                 seed: int = 0, model: str = "mlp",
                 model_params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``user_level_diffusion`` on each user's record; identity-score the result."""
    from fl_sim.identity import identity_scores, load_identity
    from fl_sim.registry import ATTACKS

    judge = load_identity(identity)
    rows = []
    for u in users:
        record = user_record(user_images(x, y, u)[:batch], u, seed=seed, model=model,
                             model_params=model_params)
        attack = ATTACKS.create("user_level_diffusion", prior=str(prior), **attack_params)
        t0 = time.perf_counter()
        recon = attack(record, generator=torch.Generator().manual_seed(seed + u))
        row = {"user": u, "seconds": round(time.perf_counter() - t0, 2),
               "label_recovered": int(recon.labels[0]), "distance": recon.matching_loss,
               **identity_scores(judge, recon.images, u)}
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {"users": n, "top1_accuracy": sum(r["identity_correct"] for r in rows) / n,
            "chance": 1 / NUM_PEOPLE,
            "sim_own_mean": sum(r["sim_own"] for r in rows) / n,
            "sim_others_mean": sum(r["sim_others"] for r in rows) / n,
            "own_above_others": sum(r["sim_own"] > r["sim_others"] for r in rows),
            "seconds_per_user": sum(r["seconds"] for r in rows) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=7)
    ap.add_argument("--prior-steps", type=int, default=800)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--num-generated", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "user_level")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, y = olivetti(args.size)
    t0 = time.perf_counter()
    prior = train_other_users_prior(args.out / "prior", size=args.size, attacked=args.users,
                                    steps=args.prior_steps)
    t_prior = time.perf_counter() - t0
    ident = train_identity_heldout(args.out / "identity", x, y, batch=args.batch)
    rows = attack_users(list(range(args.users)), x, y, prior=prior, identity=ident,
                        batch=args.batch, attack_params={"iterations": args.iterations,
                                                         "num_generated": args.num_generated})
    out = {"config": {k: str(v) for k, v in vars(args).items()},
           "prior_seconds": round(t_prior, 1), "summary": summary(rows), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    sys.stdout.write(json.dumps(out["summary"], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
