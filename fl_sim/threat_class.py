"""The attacker class of a result in the gradient-inversion SoK's taxonomy (pure; no torch).

Carletti et al., "SoK: Gradient Inversion Attacks in Federated Learning" (USENIX Security
2025) order attackers by what they know, each class adding to the one before:

=====  ========================  ================================================================
class  name                      knowledge added
=====  ========================  ================================================================
A      eavesdropper              the update, the architecture, the sample count
B      informed eavesdropper     data assumptions: smoothness (TV), the pixel range
C      parameter-aware           training details: local lr, batch size, epochs, optimiser
D      data-enhanced             surrogate data of a similar distribution (e.g. a prior)
E      statistical               the client's data distribution (BatchNorm statistics)
=====  ========================  ================================================================

:func:`threat_class` DERIVES the class of one ``attacks.jsonl`` row from what the attack
recorded it used (its resolved ``params``, the ``knowledge`` it was granted and assumed, the
update it read), never from the attack's name: the highest letter with a reason wins, and every
reason is listed. fl-sim's mapping of its knowledge to the letters:

- B: ``tv_weight > 0``; reconstructed images (every image an attack returns is in [0, 1]: the
  candidates are boxed or clamped to the pixel range).
- C: unrolled local training (``knowledge.local_training``: lr, local steps, batch size,
  optimiser); a FedAvg delta read as one gradient with the client's lr and local steps; the
  client's private training randomness granted (diffusion ``eps`` / ``t``).
- D: a prior trained on other data (``knowledge.prior``; not GIDM's default, the global model
  itself, which an A attacker already holds); an inference attack's auxiliary data
  (``knowledge.auxiliary``: held-out examples, shadow models' training data). The candidate
  set of a membership attack is the question it answers, not a letter.
- E: BatchNorm statistics as a prior on the client's batch (``bn_prior_weight > 0``,
  GradInversion); the client's labels granted from its ground truth (recovered labels, e.g.
  iDLG's, come from the update and add nothing).

The vantage point (``server``, a curious ``peer``, the ``aggregate`` a SecAgg+ server holds)
has no letter in the taxonomy (its attackers sit on the server/eavesdropper's path); it is
returned beside the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CLASSES", "threat_class", "class_of_row", "threat_class_label"]

#: letter -> the SoK's name of the attacker class
CLASSES: dict[str, str] = {"A": "eavesdropper", "B": "informed eavesdropper",
                           "C": "parameter-aware eavesdropper",
                           "D": "data-enhanced eavesdropper", "E": "statistical eavesdropper"}

_PRIOR_NOT_DATA = {"", "none", "global model", "none (pixels only)"}


def _reasons(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    params = row.get("params") or {}
    knowledge = row.get("knowledge") or {}
    out = [("A", "the update, the architecture and the sample count")]
    tv = params.get("tv_weight") or 0
    if tv:
        out.append(("B", f"smoothness prior: total variation (tv_weight {tv})"))
    if _reconstructs_images(row):
        out.append(("B", "pixel range: images boxed / clamped to [0, 1]"))
    lt = knowledge.get("local_training")
    if isinstance(lt, Mapping):
        opt = lt.get("optimizer")
        name = opt.get("name") if isinstance(opt, Mapping) else opt
        out.append(("C", f"local training unrolled: lr {lt.get('lr')}, "
                         f"{lt.get('local_steps')} steps of batch {lt.get('batch_size')}, "
                         f"optimiser {name}"))
    elif row.get("update_kind") == "delta" or lt == "delta matched as one gradient":
        out.append(("C", "a FedAvg delta read as one gradient: assumes the client's "
                         "optimiser (SGD) and its lr x local steps"))
    aux = [k for k in ("eps", "t") if knowledge.get(k) == "granted"]
    if aux:
        out.append(("C", f"the client's training randomness granted ({', '.join(aux)})"))
    prior = str(knowledge.get("prior", "") or "").strip()
    if prior.lower() not in _PRIOR_NOT_DATA:
        data = knowledge.get("prior_data")
        what = f" trained on {data.get('data')}" if isinstance(data, Mapping) and \
            data.get("data") else ""
        out.append(("D", f"public data: the prior {prior}{what}"))
    if knowledge.get("auxiliary"):  # an inference attack's population / shadow data
        out.append(("D", f"surrogate data: {knowledge['auxiliary']}"))
    bn = params.get("bn_prior_weight") or 0
    if bn:
        out.append(("E", f"BatchNorm statistics as a prior on the client's batch "
                         f"(bn_prior_weight {bn})"))
    if knowledge.get("labels") in ("granted", "given"):
        out.append(("E", "the client's labels (granted from its ground truth)"))
    return out


def _reconstructs_images(row: Mapping[str, Any]) -> bool:
    metrics = row.get("metrics") or {}
    n = metrics.get("num_reconstructed")
    return bool(n) if n is not None else bool(row.get("grid"))


def threat_class(row: Mapping[str, Any]) -> dict[str, Any]:
    """The SoK attacker class of one attack result row (see the module doc for the mapping).

    ``row``: an ``attacks.jsonl`` row (``view``, ``params``, ``knowledge``, ``metrics``,
    optionally ``update_kind`` / ``fallback_from``). Returns ``{"class": letter, "name": the
    SoK's name, "reasons": ["B: ...", ...] (every letter's reasons, in order), "vantage":
    "server" | "peer" | "aggregate"}``. Pure: the same row always gives the same answer.

    >>> threat_class({"view": "server", "params": {"tv_weight": 0.2},
    ...               "metrics": {"num_reconstructed": 1}})["class"]
    'B'
    >>> threat_class({"view": "peer", "params": {}, "metrics": {}})["class"]
    'A'
    """
    reasons = _reasons(row)
    letter = max(letter for letter, _ in reasons)
    return {"class": letter, "name": CLASSES[letter],
            "reasons": [f"{letter_}: {why}" for letter_, why in reasons],
            "vantage": str(row.get("view", "server"))}


def class_of_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's ``threat_class`` field or, for a row written before results carried one,
    :func:`threat_class` derived from the row itself."""
    tc = row.get("threat_class")
    return dict(tc) if isinstance(tc, Mapping) else threat_class(row)


def threat_class_label(row: Mapping[str, Any]) -> str:
    """``"C (server)"``: the class and vantage point of a row (:func:`class_of_row`)."""
    tc = class_of_row(row)
    return f"{tc['class']} ({tc['vantage']})"
