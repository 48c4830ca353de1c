"""Run attack plug-ins on recorded views and score them against ground truth.

Shared by the online hook (the ServerApp calls :func:`run_round_attacks` after each round and
:func:`run_final_attacks` at the end) and the offline replay (``fl-sim attack RUN_DIR``).
The attack receives only the record its view builds (plus the knowledge it asked for, which
is granted explicitly and written into the result); ground truth is read here, after the
attack returned, by the metrics alone.

Defaults: an attack without ``rounds`` runs on round 1 only (attacks are expensive; list the
rounds you want); a server attack without ``client`` targets the lowest client id that
replied in that round; a peer attack without ``client`` uses the first ``peer_clients``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fl_sim.attack_plan import announced
from fl_sim.capabilities import defenses_with
from fl_sim.config import AttackConfig, ExperimentConfig, attack_problem
from fl_sim.errors import ConfigError, FlSimError, InvalidRecordError
from fl_sim.extras import extras_to_json
from fl_sim.identity import score_identity
from fl_sim.inference import run_inference_attack
from fl_sim.metrics import label_accuracy, lpips, score_reconstruction
from fl_sim.prior_overlap import overlap_field
from fl_sim.records import GroundTruthRecord, ObservationRecord
from fl_sim.registry import ATTACKS, validate_params
from fl_sim.run_dir import load_run
from fl_sim.run_dir.files import RESULTS_FILE, load_results
from fl_sim.run_dir.images import save_grid
from fl_sim.seeding import torch_generator
from fl_sim.stores import append_jsonl
from fl_sim.threat_class import threat_class
from fl_sim.views import VIEWS, aggregate_training, view_of  # noqa: F401 (aggregate_training re-exported)

logger = logging.getLogger(__name__)

_BUDGET_KEYS = ("max_iterations", "restarts", "iterations", "steps", "phase1_iterations",
                "phase2_iterations", "sampler_steps", "projection_iterations")


def _load_run(run_dir: Path) -> Any:
    return load_run(run_dir)


def run_round_attacks(run_dir: Path, cfg: ExperimentConfig, server_round: int,
                      ) -> list[dict[str, Any]]:
    """Online hook: every configured SERVER attack scheduled for ``server_round`` (those on
    the final model wait for the end of the run)."""
    todo = [(a, server_round) for a in cfg.attacks
            if VIEWS[a.view].server_side and server_round in (a.rounds or (1,))
            and not _on_final_model(a)]
    return _run_configured(Path(run_dir), cfg, todo)


def run_final_attacks(run_dir: Path, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """End-of-run hook: PEER attacks on the recorded peer views (they need round r + 1) and
    attacks on the final model (membership inference, ``target = "final"``)."""
    todo = [(a, r) for a in cfg.attacks if not VIEWS[a.view].server_side or _on_final_model(a)
            for r in a.rounds or (1,)]
    return _run_configured(Path(run_dir), cfg, todo)


def _on_final_model(a: AttackConfig) -> bool:
    """Does attack entry ``a`` attack the final global model (resolved ``target``)?"""
    cls = ATTACKS.get(a.name)
    if not hasattr(cls, "target_model"):
        return False
    return validate_params(cls, a.params, where=f"attack {a.name}").get("target") == "final"


def _run_configured(run_dir: Path, cfg: ExperimentConfig,
                    todo: Sequence[tuple[AttackConfig, int]]) -> list[dict[str, Any]]:
    """Run each ``(attack, round)`` not yet in the results (a resumed run may have written
    some already); the results file and the run directory are read once."""
    done = {r.get("key") for r in load_results(run_dir)}
    pending = [(a, server_round, key) for a, server_round in todo
               if (key := _key(a.name, a.view, server_round, a.client, a.params)) not in done]
    run = _load_run(run_dir) if pending else None
    results = []
    for a, server_round, key in pending:
        try:
            results += run_attack(run_dir, cfg, a.name, a.params, view=a.view,
                                  client=a.client, server_round=server_round, key=key, run=run)
        except Exception as exc:  # noqa: BLE001 -- a failing attack must not fail the run
            if isinstance(exc, FlSimError):
                logger.error("attack %s (round %d) failed: %s", a.name, server_round, exc)
            else:  # a bug in a plug-in: keep the traceback in the log
                logger.exception("attack %s (round %d) crashed", a.name, server_round)
            _append(run_dir, {"key": key, "attack": a.name, "view": a.view,
                              "round": server_round, "client": a.client,
                              "error": f"{type(exc).__name__}: {exc}"})
    return results


def replay(run_dir: Path, name: str, *, params: Mapping[str, Any] | None = None,
           view: str | None = None, client: int | None = None,
           rounds: Sequence[int] | None = None, device: str | None = None
           ) -> list[dict[str, Any]]:
    """Offline: run attack ``name`` on a recorded run (``fl-sim attack``); ``device``
    (cpu / cuda / auto) overrides the run's ``run.device``."""
    run = _load_run(run_dir)
    params = dict(params or {})
    attack_cls = ATTACKS.get(name)
    view = view or getattr(attack_cls, "view", "server")
    client = view_of(view).default_client(run.config, client)
    entry = AttackConfig(name=name, view=view, client=client,  # type: ignore[arg-type]
                         rounds=tuple(rounds) if rounds else None)
    if (problem := attack_problem(entry, run.config.federation)) is not None:
        raise ConfigError(f"attack {name}: {problem}")
    done = {r["key"]: r for r in load_results(run_dir) if "error" not in r}
    out = []
    for r in rounds or (1,):
        key = _key(name, view, r, client, params)
        if key in done:  # same run, attack, params, view, round, client: same seeded result
            logger.info("%s (round %d) is already in %s (key %s); not re-run", name, r,
                        RESULTS_FILE, key)
            out.append(done[key])
            continue
        try:
            res = run_attack(Path(run_dir), run.config, name, params, view=view,
                             client=client, server_round=r, key=key, run=run, device=device)
            out += res
            if res:  # `--round 1 --round 1` runs it once
                done[key] = res[-1]
        except InvalidRecordError as exc:  # recorded, then one line at the CLI
            _append(run_dir, {"key": key, "attack": name, "view": view, "round": r,
                              "client": client, "error": f"{type(exc).__name__}: {exc}"})
            raise
    return out


def check_finite_record(record: ObservationRecord) -> None:
    """Raise :class:`~fl_sim.errors.InvalidRecordError` if any floating-point tensor of the
    record (global model, update, a peer's own update) holds NaN or inf: an attack on it
    would score garbage as a result."""
    parts = {"global model": record.global_params, "own update": record.own_update or {},
             "update": record.update}
    for what, tensors in parts.items():
        bad = [k for k, t in tensors.items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            hint = (" (the others' update derived from it would be NaN too)"
                    if what == "own update" else "")
            raise InvalidRecordError(
                f"round {record.server_round}, client {record.client_id} ({record.tap}): the "
                f"recorded {what} holds NaN/inf in {', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}{hint}; refusing to attack invalid data")


def run_attack(run_dir: Path, cfg: ExperimentConfig, name: str, params: Mapping[str, Any],
               *, view: str, client: int | None, server_round: int, key: str,
               run: Any = None, device: str | None = None) -> list[dict[str, Any]]:
    """Build the view, run one attack on one record, score it, write grid + result line.

    The attack computes on ``device`` (default: the run's ``run.device``; results come back
    on CPU). Images an attack returns per phase (``extras["phase1_images"]`` ...) are scored
    too: ``metrics["phase1_psnr"]``, ``["phase1_ssim"]``.
    """
    run = run or _load_run(run_dir)
    device = device or getattr(cfg.run, "device", "cpu")
    attack = ATTACKS.create(name, _where=f"attack {name}", **params)
    grant = tuple(attack.required_knowledge())
    view, fallback_from = resolve_view(run.config, name, view)
    record = view_of(view).record(run, server_round, client=client, grant=grant)
    check_finite_record(record)
    if getattr(attack, "inference", None):  # membership / property scores (issue 22)
        result = run_inference_attack(
            run_dir, cfg, name, attack, record, view=view, grant=grant, client=client,
            server_round=server_round, key=key, run=run, device=device,
            head={**({"fallback_from": fallback_from,
                      "view_fallback": view_fallback_text(fallback_from, view, run.config)}
                     if fallback_from else {}),
                  "client": record.client_id, "params": resolved_params(name, params)})
        result["threat_class"] = threat_class(result)
        _append(run_dir, result)
        return [result]
    gen = torch_generator(cfg.run.seed, "attack", name, server_round, record.client_id or 0)
    # the plan (images, unrolled steps, iterations, time, memory) before any work, then
    # progress lines while it runs (issue 24 item 8)
    with announced(name, attack, record):
        t0 = time.perf_counter()
        recon = attack(record, generator=gen, device=device)
    seconds = time.perf_counter() - t0
    truth_images, truth_labels = _truth(run, record, view, server_round)
    metrics = _score(recon, truth_images, truth_labels)
    metrics.update(_score_phases(recon.extras, truth_images))
    if cfg.metrics.identity_model and recon.images.numel():  # user-level: who is shown
        metrics.update(score_identity(cfg.metrics.identity_model, recon.images, truth_labels))
    if view_of(view).per_client and "t" in recon.extras:  # attacks that search eps/t
        metrics.update(score_diffusion_aux(recon.extras, run.truth(server_round,
                                                                   record.client_id), metrics))
    grid = plain_key = None
    if recon.images.numel():
        # Originals over their Hungarian-matched reconstructions (the scoring's matching).
        r_idx, t_idx = metrics["recon_index"], metrics["truth_index"]
        recon_m, truth_m = recon.images[r_idx], truth_images[t_idx]
        if cfg.metrics.lpips_weights:
            metrics["lpips"] = float(lpips(recon_m, truth_m, weights_path=cfg.metrics.lpips_weights,
                                           net=cfg.metrics.lpips_net).mean())
        grid_path = run_dir / "attacks" / f"{name}_{view}_r{server_round}_c{record.client_id}" \
                                         f"_{key[-6:]}.png"
        plain_key = next((k for k in _PLAIN_KEYS if isinstance(recon.extras.get(k), torch.Tensor)
                          and recon.extras[k].shape == recon.images.shape), None)
        save_grid(grid_path, truth_m, recon_m,
                  plain=recon.extras[plain_key][r_idx] if plain_key else None)
        grid = str(grid_path.relative_to(run_dir))
    if exact := exact_metrics(metrics):  # +inf (a perfect PSNR) is null in strict JSON
        metrics["exact"] = exact
    result = {
        "key": key, "attack": name, "view": view, "round": server_round,
        **({"fallback_from": fallback_from,  # the view asked for, and in words (item 7a)
            "view_fallback": view_fallback_text(fallback_from, view, run.config)}
           if fallback_from else {}),
        # every parameter the attack ran with, defaults included (the key hashes the given)
        "client": record.client_id, "params": resolved_params(name, params),
        "update_kind": record.update_kind,
        "knowledge": {**{k: "granted" for k in grant}, **dict(recon.knowledge)},
        "budget": {k: params.get(k, getattr(attack, k, None)) for k in _BUDGET_KEYS
                   if params.get(k, getattr(attack, k, None)) is not None},
        "defenses": list(record.defenses), "seconds": round(seconds, 3),
        # an adaptive attack modelled the public defenses (attacks/adaptive.py): what it did
        "adaptive": bool(getattr(attack, "adaptive", False)),
        "adapted_to": list(recon.extras.get("adapted_to", [])),
        "iterations": recon.iterations, "matching_loss": _finite(recon.matching_loss),
        "num_images": int(truth_images.shape[0]), "metrics": metrics, "grid": grid,
        # a prior's measured overlap with the attacked images (fl_sim.prior_overlap)
        **overlap_field(attack, truth_images),
        **({"grid_plain": plain_key} if grid and plain_key else {}),
        # JSON-safe; large tensors (e.g. phase images) saved beside the grid, path in the row
        "extras": extras_to_json(recon.extras, run_dir, f"attacks/{name}_{view}_r{server_round}"
                                                        f"_c{record.client_id}_{key[-6:]}"),
    }
    # the SoK attacker class (A-E) derived from what the row says the attack used
    result["threat_class"] = threat_class(result)
    _append(run_dir, result)
    logger.info("%s on round %d client %s: %s", name, server_round, record.client_id,
                {k: v for k, v in metrics.items() if not isinstance(v, list)})
    return [result]


def resolved_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Attack ``name``'s parameters as validated, defaults included, as plain JSON data."""
    resolved = validate_params(ATTACKS.get(name), params, where=f"attack {name}")
    return json.loads(json.dumps(resolved, default=_plain_param))


def _plain_param(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | set | frozenset) else repr(v)


#: extras holding the same attack's images before its prior: the grid's middle row
_PLAIN_KEYS = ("before_images", "phase1_images")


def resolve_view(cfg: ExperimentConfig, name: str, view: str) -> tuple[str, str | None]:
    """``(view used, view asked for if it fell back)``: under a defense that hides the
    per-client updates (SecAgg+) a ``"server"`` attack runs on the ``"aggregate"`` (logged;
    :meth:`fl_sim.views.View.resolve`). An attack that needs one client's update cannot run
    on an aggregate (one-line error)."""
    used, asked = view_of(view).resolve(cfg.defenses)
    if asked is not None:
        # a warning, and ``view_fallback`` in the result: the figure is NOT a per-client one
        logger.warning("%s: under %s the server holds only the aggregate; attacking the "
                       "aggregate instead of one client's update (view_fallback in the "
                       "result)", name, _hiding(cfg))
    if used.holds_sum and getattr(ATTACKS.get(name), "needs_client_update", False):
        why = f"under {_hiding(cfg)} the server has only the aggregate" if asked else \
            f"view = \"{used.name}\" holds the sum of several clients"
        raise ConfigError(f"attack {name} needs one client's update; {why}")
    return used.name, asked.name if asked else None


def _hiding(cfg: ExperimentConfig) -> str:
    """The configured defenses that hide per-client updates, in words (``"secagg_plus"``)."""
    return ", ".join(defenses_with("hides_per_client_updates", cfg.defenses))


def view_fallback_text(asked: str, used: str, cfg: ExperimentConfig) -> str:
    """``"server→aggregate (secagg_plus)"``: the view asked for, the one used, and the
    defense that forced it (the result's ``view_fallback``)."""
    return f"{asked}→{used} ({_hiding(cfg) or 'no per-client view'})"


def exact_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """The metric names whose value is +inf — a perfect reconstruction's PSNR — which strict
    JSON writes as null; the result lists them in ``metrics["exact"]`` so tables can show
    "exact" and never confuse them with a missing or failed value.

    >>> exact_metrics({"psnr": float("inf"), "ssim": 1.0, "start_psnr": 9.5, "mse": 0.0})
    ['psnr']
    """
    return sorted(k for k, v in metrics.items() if isinstance(v, float) and v == math.inf)


def _truth(run: Any, record: ObservationRecord, view: str,
           server_round: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The private images the reconstruction is scored against (analysis only): those of
    every client the view's record was computed from (:meth:`fl_sim.views.View.truth_clients`)."""
    truths: list[GroundTruthRecord] = [
        run.truth(server_round, c)
        for c in view_of(view).truth_clients(run, server_round, record.client_id)]
    images = [t.images for t in truths if t.images.numel()]
    labels = [t.labels for t in truths if t.labels.numel()]
    if not images:
        raise FlSimError(f"no ground truth recorded for round {server_round} (was "
                         "federation.record_truth disabled?)")
    return torch.cat(images), torch.cat(labels)


def _score(recon: Any, truth_images: torch.Tensor, truth_labels: torch.Tensor,
           ) -> dict[str, Any]:
    if recon.images.numel():
        s = score_reconstruction(recon.images, truth_images, recon_labels=recon.labels,
                                 truth_labels=truth_labels)
        return {k: _plain(v) for k, v in s.items()}
    if recon.labels is not None:
        return {"label_accuracy": float(label_accuracy(recon.labels, truth_labels)),
                "labels": recon.labels.tolist(), "true_labels": truth_labels.tolist()}
    return {}


def score_diffusion_aux(extras: Mapping[str, Any], truth: GroundTruthRecord,
                        metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Recovered timesteps and noise of a diffusion attack against the client's true ones.

    ``extras["t"]``: ``[B]`` recovered timesteps, ``extras.get("eps")``: ``[B, C, H, W]``
    recovered noise, in reconstruction order; the truth's per-step ``aux`` holds ``eps``/``t``
    in the order of its images. Pairs follow the image scoring's matching (``recon_index`` /
    ``truth_index``). Returns ``t_recovered``, ``t_true``, ``t_abs_error`` (lists in matched
    order), ``t_abs_error_mean`` and, with eps, ``eps_rel_error`` (mean over pairs of
    ``|eps_hat - eps| / |eps|``) and ``eps_rel_error_per_image``; ``{}`` without true aux.
    """
    steps = [s for s in truth.steps if "t" in s.aux]
    if not steps:
        return {}
    t_true = torch.cat([s.aux["t"].flatten() for s in steps]).double()
    t_hat = torch.as_tensor(extras["t"], dtype=torch.float64).flatten()
    r_idx = list(metrics.get("recon_index") or range(min(len(t_hat), len(t_true))))
    t_idx = list(metrics.get("truth_index") or range(len(r_idx)))
    pairs = [(r, t) for r, t in zip(r_idx, t_idx, strict=True)
             if r < len(t_hat) and t < len(t_true)]
    if not pairs:
        return {}
    rec = [float(t_hat[r]) for r, _ in pairs]
    tru = [float(t_true[t]) for _, t in pairs]
    err = [abs(a - b) for a, b in zip(rec, tru, strict=True)]
    out: dict[str, Any] = {"t_recovered": rec, "t_true": tru, "t_abs_error": err,
                           "t_abs_error_mean": sum(err) / len(err)}
    eps_hat = extras.get("eps")
    if isinstance(eps_hat, torch.Tensor) and all("eps" in s.aux for s in steps):
        eps = torch.cat([s.aux["eps"] for s in steps]).double()
        e = eps_hat.double()
        rel = [float((e[r] - eps[t]).norm() / eps[t].norm().clamp_min(1e-12))
               for r, t in pairs]
        out["eps_rel_error"], out["eps_rel_error_per_image"] = sum(rel) / len(rel), rel
    return out


def _score_phases(extras: Mapping[str, Any], truth_images: torch.Tensor) -> dict[str, float]:
    """Mean PSNR / SSIM of every ``extras["<phase>_images"]`` tensor (e.g. GIDM's phase 1)."""
    out: dict[str, float] = {}
    for key, images in extras.items():
        if key.endswith("_images") and isinstance(images, torch.Tensor) and images.numel():
            s = score_reconstruction(images, truth_images)
            phase = key[:-len("_images")]
            out[f"{phase}_psnr"], out[f"{phase}_ssim"] = float(s["psnr"]), float(s["ssim"])
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() > 1 else float(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _finite(x: float) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else float(x)


def _key(name: str, view: str, server_round: int, client: int | None,
         params: Mapping[str, Any]) -> str:
    blob = json.dumps([name, view, server_round, client, dict(params)], sort_keys=True,
                      default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _append(run_dir: Path, result: Mapping[str, Any]) -> None:
    append_jsonl(Path(run_dir) / RESULTS_FILE, json.loads(json.dumps(result, default=_plain)))
