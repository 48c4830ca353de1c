"""Canary examples in the clients' data: the plumbing of :mod:`fl_sim.audits.canary_examples`.

Steinke, Nasr, Jagielski (NeurIPS 2023) include each of m canary examples in training with
probability 1/2. fl-sim's canaries are m examples of the TEST split (never in any client's
training data) with a wrong label drawn at random (seeded): a mislabeled example is learnt
only if it is trained on, so its loss under the final model tells members from non-members.
Deviation: the paper's black-box audit also uses mislabeled / out-of-distribution canaries;
the choice of the test split is fl-sim's (no extra data, nothing downloaded).

Each included canary goes to client ``j mod num_clients`` (j its position among the m), so
every client process derives the same assignment from the config alone (a pure function of
``run.seed``): :func:`canary_examples` is what the ServerApp (truth, scoring) and each
ClientApp (its extra examples) both call. Truth (images, labels, inclusion, client) is written
to ``truth/audits/`` by the server; the result row to ``audits.jsonl``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from defenses.accounting import EXAMPLE
from fl_sim.audits import canary_examples as est
from fl_sim.capabilities import defenses_with
from fl_sim.config import check_audit, from_dict
from fl_sim.errors import ConfigError
from fl_sim.federation.partitions import load_splits, section_json
from fl_sim.registry import DEFENSES
from fl_sim.run_dir.files import AUDITS_FILE, read_metrics
from fl_sim.seeding import numpy_rng
from fl_sim.stores import append_jsonl, write_tensors


@dataclass(frozen=True)
class CanaryExamples:
    """m canary examples: images [m, C, H, W], (wrong) labels [m], included [m] bool,
    client [m] (-1 where not included)."""

    index: int
    images: Tensor
    labels: Tensor
    included: np.ndarray
    client: np.ndarray


def canary_examples(cfg: Any) -> CanaryExamples | None:
    """The canaries of the config's first ``canary_examples`` audit, or None."""
    for i, a in enumerate(cfg.audits):
        if a.name == "canary_examples":
            return _canaries(json.dumps(cfg.to_json_dict(), sort_keys=True), i)
    return None


@lru_cache(maxsize=4)
def _canaries(cfg_json: str, index: int) -> CanaryExamples:
    cfg = from_dict(json.loads(cfg_json))
    audit = check_audit(cfg, index)
    test = load_splits(section_json(cfg.data)).test
    m, n = audit.num_canaries, len(test.labels)
    if m > n:
        raise ConfigError(f"audits[{index}].num_canaries = {m}: the test split holds {n} "
                          "examples to draw canaries from")
    rng = numpy_rng(cfg.run.seed, "audit", index, "canary_examples")
    pick = rng.permutation(n)[:m]
    classes = int(test.labels.max()) + 1
    shift = rng.integers(1, max(classes, 2), size=m)
    labels = (test.labels[torch.from_numpy(pick)] + torch.from_numpy(shift)) % max(classes, 2)
    included = est.inclusion_draw(m, rng)
    client = np.where(included, np.arange(m) % cfg.federation.num_clients, -1)
    return CanaryExamples(index, test.images[torch.from_numpy(pick)].clone(),
                          labels.to(torch.int64), included, client)


def canaries_of_client(cfg: Any, client_id: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(images, labels, dataset indices)`` of the canaries client ``client_id`` trains on
    (indices ``-1 - j``: never a training-set position), or None."""
    c = canary_examples(cfg)
    if c is None:
        return None
    mine = np.flatnonzero(c.client == client_id)
    if mine.size == 0:
        return None
    sel = torch.from_numpy(mine)
    return c.images[sel], c.labels[sel], torch.from_numpy(-1 - mine).to(torch.int64)


def score_and_write(cfg: Any, task: Any, final: Any, run_dir: Path) -> dict[str, Any] | None:
    """Score every canary by its loss under the final model, bound ε, write truth and row."""
    c = canary_examples(cfg)
    if c is None:
        return None
    audit = check_audit(cfg, c.index)
    task.model.load_state_dict(final, strict=True)
    task.model.eval()
    with torch.no_grad():
        logits = task.model(task.normalize(c.images)) if hasattr(task, "normalize") \
            else task.model(c.images)
        loss = torch.nn.functional.cross_entropy(logits, c.labels, reduction="none")
    scores = (-loss).double().numpy()  # low loss: guessed "included"
    res = est.audit_scores(scores, c.included, k_pos=audit.k_pos, k_neg=audit.k_neg,
                           delta=audit.delta, confidence=audit.confidence)
    write_tensors(Path(run_dir) / "truth" / "audits" / f"a{c.index}_canary_examples.safetensors",
                  {"images": c.images, "labels": c.labels,
                   "included": torch.from_numpy(c.included),
                   "client": torch.from_numpy(c.client)}, {"num_canaries": len(c.labels)})
    row = {**audit.describe(), "audit_index": c.index, "kind": "lower_bound",
           "epsilon": res.epsilon if math.isfinite(res.epsilon) else None,
           "epsilon_infinite": not math.isfinite(res.epsilon),
           "guesses": res.guesses, "correct": res.correct,
           "observed_scores": [float(s) for s in scores[c.included]],
           "unobserved_scores": [float(s) for s in scores[~c.included]],
           **claimed_example_epsilon(cfg, run_dir)}
    append_jsonl(Path(run_dir) / AUDITS_FILE, row)
    return row


def example_level_dp(cfg: Any) -> list[str]:
    """The configured defenses whose reported ε is about one example (DP-SGD)."""
    return [n for n in defenses_with("reports_epsilon", cfg.defenses)
            if getattr(DEFENSES.get(n), "privacy_unit", None) == EXAMPLE]


def claimed_example_epsilon(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The example-level ε the run's DP defense claims (dp_sgd: it declares
    ``reports_epsilon`` with ``privacy_unit = "example"``; the last metrics row: max over
    clients)."""
    d = next((d for d in cfg.defenses if d.name in example_level_dp(cfg)), None)
    rows = [r for r in read_metrics(Path(run_dir)) if "dp_epsilon" in r]
    if d is None or not rows:
        return {"claimed_epsilon": None, "claimed_by": None}
    last = rows[-1]
    return {"claimed_epsilon": last.get("dp_epsilon"), "claimed_by": d.name,
            "claimed_unit": last.get("dp_unit"), "claimed_neighbouring":
            last.get("dp_neighbouring"), "claimed_delta": d.params.get("delta", 1e-5)}
