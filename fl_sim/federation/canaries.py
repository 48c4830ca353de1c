"""Canary clients in the federation: the plumbing of :mod:`fl_sim.audits.canary_clients`.

Andrew et al. (ICLR 2024) insert canary clients into client sampling: a canary takes part in
a round with the probability a real client does (sampled / num_clients, a seeded coin per
canary and round) and, when it does, sends the fixed update ``norm · c_i`` (``c_i`` a random
unit direction over the model's floating-point parameters; ``norm`` the clipping norm of the
DP defense in force, else the median norm of the round's real updates). The update goes
through what a real update goes through after it leaves the client: local DP noise (the
client-side mechanism, applied with the canary's own seeded generator), then the strategy
with its central-DP clipping and noise. Canaries do no training.

"Observed" canaries are all canaries in the population (sampled each round at the real
clients' rate, so the sampling randomness is part of the mechanism, as the accountant's
subsampling assumes); "unobserved" ones were never in it.

Where they enter: :class:`~fl_sim.federation.taps.TapStrategy` hands the wrapped strategy the
real replies it recorded plus :meth:`CanaryClients.replies`; the tap never records a canary,
so no view (server, peer, aggregate records' client lists) holds one and attacks never see
them. Their directions and inclusion are written to the truth store
(``truth/audits/``); the result to ``audits.jsonl``. What the canaries accumulate during the
run (inclusion coins, every round's cosines, the server view's scores) goes into every
checkpoint (:func:`audit_state`), so a resumed run scores exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from defenses.base import UpdateContext
from fl_sim.audits import canary_clients as est
from fl_sim.config import check_audit
from fl_sim.defended import build_defenses
from fl_sim.errors import RunDirError
from fl_sim.federation import protocol as P
from fl_sim.federation.taps import sample_clients
from fl_sim.run_dir.files import AUDITS_FILE
from fl_sim.seeding import numpy_rng, torch_generator
from fl_sim.stores import append_jsonl, write_tensors

logger = logging.getLogger(__name__)

#: canary clients' partition ids in their replies (never a real client's 0..n-1)
CANARY_ID_BASE = -1


def float_keys(state: Mapping[str, Any]) -> list[str]:
    """The floating-point entries of a state dict: what canaries and deltas span."""
    return [k for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def flatten(state: Mapping[str, Any], keys: Sequence[str]) -> np.ndarray:
    """``keys`` of ``state`` as one float64 vector ``(d,)``."""
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


class CanaryClients:
    """One ``canary_clients`` audit during a run (state: canaries, inclusion, cosines)."""

    def __init__(self, audit: Any, index: int, *, cfg: Any, run_dir: Path,
                 initial: Mapping[str, np.ndarray]) -> None:
        self.audit, self.index, self.run_dir = audit, index, Path(run_dir)
        self.seed = int(cfg.run.seed)
        fed = cfg.federation
        self.rate = len(sample_clients(self.seed, 1, list(range(fed.num_clients)),
                                       fed.fraction_train, "train")) / fed.num_clients
        self.keys = float_keys(initial)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for key in self.keys:
            n = int(np.asarray(initial[key]).size)
            self.offsets[key], start = (start, n), start + n
        self.initial = flatten(initial, self.keys)
        k, u = audit.num_canaries, audit.num_unobserved
        rng = numpy_rng(self.seed, "audit", index, "canary_directions")
        self.directions = est.random_canaries(k + u, self.initial.size, rng)
        self.inserted = np.zeros((fed.num_rounds, k), dtype=bool)
        self.round_cosines: list[np.ndarray] = []  # every_global: (k + u,) per round
        self.server_stats: tuple[list[float], list[float]] = ([], [])
        defenses = {d.name: d for d in build_defenses(cfg)}
        self.local_dp = defenses.get("local_dp")
        self.central = defenses.get("central_dp")
        self._global = self.initial

    # -- during the run ----------------------------------------------------------------------
    def replies(self, server_round: int, global_state: Mapping[str, Any],
                accepted: Sequence[Message], inner: Any) -> list[Message]:
        """This round's canary replies (weights ``global + update``), built like the real
        ``accepted`` ones (same keys, the mean number of examples as FedAvg weight)."""
        self._global = flatten(global_state, self.keys)
        rng = numpy_rng(self.seed, "audit", self.index, "round", server_round)
        now = rng.random(self.audit.num_canaries) < self.rate
        self.inserted[server_round - 1] = now
        if not now.any() or not accepted:
            return []
        norm = self._norm(accepted, inner)
        weight = max(1, round(float(np.mean([_num_examples(m) for m in accepted]))))
        out = []
        for i in np.flatnonzero(now):
            update = norm * self.directions[i]
            if self.local_dp is not None:
                update = self._local_dp(update, server_round, int(i))
            if self.audit.needs_client_update:  # the audit reads the server's view
                self._server_view(update, int(i))
            out.append(self._message(self._global + update, weight, int(i), accepted[0]))
        return out

    def after_round(self, server_round: int, new_global: Mapping[str, Any]) -> None:
        """Record the cosines of this round's model delta with every canary (only the
        ``every_global`` view reads them: the others skip the (k + u) × d product)."""
        if self.audit.view != "every_global":
            return
        new = flatten(new_global, self.keys)
        delta = new - self._global
        if np.linalg.norm(delta) > 0:
            self.round_cosines.append(est.cosines(self.directions, delta))

    # -- checkpoint ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed run needs to score as an uninterrupted one, JSON-ready: the
        inclusion coins so far, every_global's per-round cosines, the server view's scores.
        (Directions and θ_0 follow from the seed and the initial model; Python floats
        round-trip exactly through JSON.)"""
        return {"inserted": self.inserted.astype(int).tolist(),
                "round_cosines": [c.tolist() for c in self.round_cosines],
                "server_stats": [list(self.server_stats[0]), list(self.server_stats[1])]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (a checkpoint of this audit after some round).

        Raises ``RunDirError`` if it does not fit this audit (other canary counts)."""
        inserted = np.asarray(state["inserted"], dtype=bool).reshape(-1, self.audit.num_canaries)
        rounds = min(len(inserted), len(self.inserted))
        cos = [np.asarray(c, dtype=np.float64) for c in state["round_cosines"]]
        if any(c.shape != (len(self.directions),) for c in cos):
            raise RunDirError(f"checkpointed canary state of audits[{self.index}] does not "
                              f"match its {len(self.directions)} canaries")
        self.inserted[:rounds] = inserted[:rounds]
        self.round_cosines = cos
        self.server_stats = ([float(x) for x in state["server_stats"][0]],
                             [float(x) for x in state["server_stats"][1]])

    # -- after the run -----------------------------------------------------------------------
    def result(self, final: Mapping[str, Any]) -> dict[str, Any]:
        """The audit's ``audits.jsonl`` row (ε estimated at the audit's δ)."""
        k = self.audit.num_canaries
        ever = self.inserted.any(axis=0)
        if self.audit.view == "final_model":
            stat = est.cosines(self.directions, flatten(final, self.keys) - self.initial)
        elif self.audit.view == "every_global":
            stat = est.all_iterates_statistic(np.stack(self.round_cosines))
        else:
            stat = None
        if stat is not None:  # observed: every canary of the population, sampled or not
            observed, unobserved = stat[:k], stat[k:]
        else:
            observed, unobserved = map(np.asarray, self.server_stats)
        row: dict[str, Any] = {**self.audit.describe(), "audit_index": self.index,
                               "kind": "estimate", "dim": int(self.initial.size),
                               "canaries_inserted": int(ever.sum()),
                               "insertions": int(self.inserted.sum()),
                               "observed_scores": [float(x) for x in observed],
                               "unobserved_scores": [float(x) for x in unobserved]}
        try:
            if getattr(self.audit, "null", "fitted") == "closed_form":
                e = est.estimate_epsilon_closed_form_null(observed, self.initial.size,
                                                          self.audit.delta)
            else:
                e = est.estimate_epsilon(observed, unobserved, self.audit.delta)
        except ValueError as exc:
            return {**row, "epsilon": None, "error": str(exc)}
        return {**row, "epsilon": e.epsilon if math.isfinite(e.epsilon) else None,
                "epsilon_infinite": not math.isfinite(e.epsilon),
                "observed_mean": e.observed_mean, "observed_std": e.observed_std,
                "unobserved_mean": e.unobserved_mean, "unobserved_std": e.unobserved_std}

    def finish(self, final: Mapping[str, Any], claimed: Mapping[str, Any]) -> dict[str, Any]:
        """Write the canaries (truth store) and the result row; return the row."""
        truth = self.run_dir / "truth" / "audits" / f"a{self.index}_canary_clients.safetensors"
        write_tensors(truth, {"directions": torch.from_numpy(self.directions.astype(np.float32)),
                              "inserted": torch.from_numpy(self.inserted)},
                      {"keys": self.keys, "num_canaries": self.audit.num_canaries})
        row = {**self.result(final), **claimed}
        append_jsonl(self.run_dir / AUDITS_FILE, row)
        return row

    # -- helpers -----------------------------------------------------------------------------
    def _norm(self, accepted: Sequence[Message], inner: Any) -> float:
        if self.local_dp is not None:
            return float(self.local_dp.clipping_norm)
        if self.central is not None:
            return float(getattr(inner, "clipping_norm", self.central.clipping_norm))
        norms = [np.linalg.norm(flatten(_arrays(m), self.keys) - self._global)
                 for m in accepted]
        return float(np.median(norms)) or 1.0

    def _local_dp(self, update: np.ndarray, server_round: int, i: int) -> np.ndarray:
        """The client-side mechanism a real client applies (clip + N(0, σ²C²))."""
        gen = torch_generator(self.seed, "audit", self.index, "round", server_round,
                              "canary", i)
        ctx = UpdateContext("delta", {}, None, (), 0.0, 1, server_round, -1 - i, gen)
        out = self.local_dp.apply({"u": torch.from_numpy(update.astype(np.float32))}, ctx)
        return out["u"].double().numpy()

    def _server_view(self, update: np.ndarray, i: int) -> None:
        k = self.audit.num_canaries
        u = self.directions[k + i % self.audit.num_unobserved]
        self.server_stats[0].append(float(est.cosines(self.directions[i:i + 1], update)[0]))
        self.server_stats[1].append(float(est.cosines(u[None], update)[0]))

    def _message(self, weights: np.ndarray, weight: int, i: int, like: Message) -> Message:
        arrays = {}
        for key, ref in _arrays(like).items():
            if key in self.offsets:
                start, n = self.offsets[key]
                arrays[key] = weights[start:start + n].reshape(ref.shape).astype(ref.dtype)
            else:
                arrays[key] = np.asarray(ref)
        ins = Message(RecordDict({"config": ConfigRecord()}),
                      dst_node_id=int(like.metadata.src_node_id),
                      message_type=MessageType.TRAIN)
        content = RecordDict({
            P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: weight, "train-loss": 0.0}),
            P.META: ConfigRecord({P.PARTITION_ID: CANARY_ID_BASE - i})})
        return Message(content, reply_to=ins)


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in next(iter(msg.content.array_records.values())).items()}


def _num_examples(msg: Message) -> float:
    return float(next(iter(msg.content.metric_records.values()))[P.NUM_EXAMPLES])  # type: ignore[arg-type]


def start_audits(cfg: Any, run_dir: Path, initial: Mapping[str, Any], tap: Any,
                 state: Mapping[str, Any] | None = None) -> list[CanaryClients]:
    """The run's canary-clients audits, hooked into ``tap`` (see module doc).

    ``initial`` is θ_0, the model before round 1 (also when resuming); ``state`` the
    checkpointed :func:`audit_state` a resumed run continues from. Rows of an earlier
    attempt are dropped from ``audits.jsonl`` (every row is written at the end of the run)."""
    (Path(run_dir) / AUDITS_FILE).unlink(missing_ok=True)
    out = []
    for i in range(len(cfg.audits)):
        audit = check_audit(cfg, i)
        if audit.name != "canary_clients":  # canary_examples: fl_sim.federation.canary_data
            continue
        arrays = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v
                  for k, v in initial.items()}
        plumbing = CanaryClients(audit, i, cfg=cfg, run_dir=run_dir, initial=arrays)
        if state and str(i) in state:
            plumbing.load_state(state[str(i)])
        tap.extra_replies.append(plumbing.replies)
        out.append(plumbing)
    return out


def audit_state(audits: Sequence[CanaryClients]) -> dict[str, Any]:
    """The checkpoint entry of the run's canary-clients audits: ``{audit index: state}``."""
    return {str(a.index): a.state() for a in audits}


def claimed_epsilon(plumbing: CanaryClients, cfg: Any) -> dict[str, Any]:
    """The ε the accountant claims for one canary client (unit client), with its relation:
    local DP over the most rounds any canary took part in, central DP over every release."""
    if plumbing.local_dp is not None:
        d = plumbing.local_dp
        eps = d.round_epsilon(max(1, int(plumbing.inserted.sum(axis=0).max())))
        rel, delta, source = d.neighbouring, d.delta, "local_dp"
    elif plumbing.central is not None:
        d = plumbing.central
        eps = d.round_epsilon(cfg, cfg.federation.num_rounds)
        rel, delta, source = d.neighbouring, d.delta, "central_dp"
    else:
        return {"claimed_epsilon": None, "claimed_by": None}
    return {"claimed_epsilon": eps if math.isfinite(eps) else None, "claimed_by": source,
            "claimed_unit": d.privacy_unit, "claimed_neighbouring": rel,
            "claimed_delta": delta}


def finish_audits(audits: Sequence[CanaryClients], cfg: Any,
                  final: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Score every audit on the final model; one ``audits.jsonl`` row each."""
    state = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v
             for k, v in final.items()}
    return [a.finish(state, claimed_epsilon(a, cfg)) for a in audits]
