"""No benchmark or test grants ground truth to a curious peer (issue 18, item 2).

Two layers: run-time guards that hold for everything (an ``ObservationRecord`` of the peer
tap refuses ground-truth knowledge; a peer attack refuses ``labels`` / ``aux = "granted"``;
``PeerView`` refuses every grant), and a static walk over ``benchmarks/``, ``tests/`` and
``configs/`` for the ways a figure could still be given ground truth: a peer attack built
with ``labels="granted"`` (directly, through ``**PARAMS`` of a dict literal assigned in the
file, or as a config entry), or a hand-built peer record carrying ``labels``.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import tomllib
import torch

from attacks.peer_diffusion_prior import PeerDiffusionPrior
from attacks.peer_inversion import PeerInversion
from fl_sim.errors import ThreatModelError
from fl_sim.records import GROUND_TRUTH_KNOWLEDGE, ModelSpec, ObservationRecord
from fl_sim.registry import ATTACKS

ROOT = Path(__file__).resolve().parents[2]
SPEC = ModelSpec(model="mlp", model_params={}, task="classifier", task_params={},
                 in_channels=1, num_classes=3, image_size=2, mean=(0.5,), std=(0.5,))
#: knowledge values that are ground truth, and the attack parameter values that ask for it
GRANT_PARAMS = ("labels", "aux")


def _record(tap: str, knowledge: dict) -> ObservationRecord:
    w = {"w": torch.zeros(2)}
    return ObservationRecord(run_id="t", server_round=1, client_id=0, tap=tap,  # type: ignore[arg-type]
                             spec=SPEC, global_params=w, update=w, update_kind="gradient",
                             num_examples=1, local_steps=1, lr=0.0, batch_size=1,
                             knowledge=knowledge)


@pytest.mark.parametrize("knowledge", [{"labels": torch.tensor([1])},
                                       {"eps": torch.zeros(1), "t": torch.tensor([3])},
                                       {"granted": ("labels",)}])
def test_a_peer_record_refuses_ground_truth(knowledge):
    with pytest.raises(ThreatModelError, match="peer record cannot carry ground truth"):
        _record("peer_view", knowledge)
    assert _record("server_in", knowledge).knowledge.keys() == knowledge.keys()  # server: ok
    _record("peer_view", {"granted": (), "derivation": "weighted_mean_minus_own"})  # public


def peer_attacks() -> list[str]:
    """Every registered attack whose declared view is the peer's."""
    return sorted(n for n in ATTACKS.names() if getattr(ATTACKS.get(n), "view", "") == "peer")


def test_every_peer_attack_refuses_a_granted_label_or_aux():
    names = peer_attacks()
    assert {"peer_inversion", "peer_diffusion_prior"} <= set(names), names
    for name in names:
        takes = inspect.signature(ATTACKS.get(name)).parameters  # a peer attack with no
        for key in (k for k in GRANT_PARAMS if k in takes):  # labels/aux cannot ask for them
            extra = {"prior": "p"} if name == "peer_diffusion_prior" else {}
            with pytest.raises(ThreatModelError, match="granted no ground truth"):
                ATTACKS.create(name, _where=name, **{key: "granted"}, **extra)
    assert PeerInversion().required_knowledge() == ()
    assert PeerDiffusionPrior(prior="p").required_knowledge() == ()


# -- the static walk ----------------------------------------------------------------------
def _peer_names() -> set[str]:
    names = set(peer_attacks())
    return names | {type(ATTACKS.get(n)).__name__ for n in names} | {
        ATTACKS.get(n).__name__ for n in names}


def _is_grant(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value == "granted"


def _dict_grants(node: ast.AST) -> bool:
    return isinstance(node, ast.Dict) and any(
        isinstance(k, ast.Constant) and k.value in GRANT_PARAMS and _is_grant(v)
        for k, v in zip(node.keys, node.values, strict=True))


def _dict_names_peer(node: ast.Dict, peers: set[str]) -> bool:
    for k, v in zip(node.keys, node.values, strict=True):
        if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and (
                (k.value == "name" and v.value in peers) or (k.value == "view"
                                                             and v.value == "peer")):
            return True
    return False


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def grants_to_peers(source: str, where: str) -> list[str]:
    """Places in ``source`` that grant a peer ground truth (see the module doc); code inside
    ``with pytest.raises(...)`` (a test that the grant is refused) is skipped."""
    tree = ast.parse(source)
    peers = _peer_names()
    module_dicts = {t.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)
                    and isinstance(node.value, ast.Dict)}
    refused = {id(n) for w in ast.walk(tree) if isinstance(w, ast.With) and any(
        isinstance(i.context_expr, ast.Call) and _callee(i.context_expr) == "raises"
        for i in w.items) for stmt in w.body for n in ast.walk(stmt)}  # a refusal test
    found = []
    for node in ast.walk(tree):
        if id(node) in refused:
            continue
        if isinstance(node, ast.Dict) and _dict_names_peer(node, peers) and _dict_grants(node):
            found.append(f"{where}:{node.lineno}: peer attack entry with a 'granted' value")
        if not isinstance(node, ast.Call):
            continue
        name = _callee(node)
        is_peer = name in peers or (name == "create" and node.args and isinstance(
            node.args[0], ast.Constant) and node.args[0].value in peers)
        if is_peer:
            for kw in node.keywords:
                given = module_dicts.get(kw.value.id) if kw.arg is None and isinstance(
                    kw.value, ast.Name) else None
                if (kw.arg in GRANT_PARAMS and _is_grant(kw.value)) or (
                        kw.arg is None and (_dict_grants(kw.value) or (
                            given is not None and _dict_grants(given)))):
                    found.append(f"{where}:{node.lineno}: {name}(...) asks for a grant")
        if name == "ObservationRecord" and any(
                kw.arg == "tap" and isinstance(kw.value, ast.Constant)
                and kw.value.value == "peer_view" for kw in node.keywords):
            for kw in node.keywords:
                if kw.arg == "knowledge" and isinstance(kw.value, ast.Dict) and any(
                        isinstance(k, ast.Constant) and k.value in GROUND_TRUTH_KNOWLEDGE
                        for k in kw.value.keys):
                    found.append(f"{where}:{node.lineno}: hand-built peer record with "
                                 "ground truth")
    return found


def test_the_walk_finds_each_kind_of_grant():
    """Not vacuous: each pattern the walk looks for is found in a snippet."""
    snippets = [
        'PeerInversion(max_iterations=3, labels="granted")',
        'PeerDiffusionPrior(prior="p", aux="granted")',
        'ATTACKS.create("peer_inversion", labels="granted")',
        'KW = {"labels": "granted"}\nPeerInversion(**KW)',
        'PeerInversion(**{"labels": "granted"})',
        'cfg = {"name": "peer_inversion", "view": "peer", "labels": "granted"}',
        'ObservationRecord(tap="peer_view", knowledge={"labels": y})',
    ]
    for s in snippets:
        assert grants_to_peers(s, "snippet"), s
    fine = ['InvertingGradients(labels="granted")',
            'cfg = {"name": "inverting_gradients", "view": "server", "labels": "granted"}',
            'PeerInversion(labels="auto")', 'ObservationRecord(tap="server_in", '
            'knowledge={"labels": y})']
    fine.append('with pytest.raises(ThreatModelError):\n    PeerInversion(labels="granted")')
    for s in fine:
        assert not grants_to_peers(s, "snippet"), s


def test_no_benchmark_test_or_config_grants_ground_truth_to_a_peer():
    this = Path(__file__).resolve()
    found = []
    for folder in ("benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() != this:  # this file's snippets are violations on purpose
                found += grants_to_peers(path.read_text(), str(path.relative_to(ROOT)))
    peers = set(peer_attacks())
    for path in sorted((ROOT / "configs").rglob("*.toml")):
        for i, a in enumerate(tomllib.loads(path.read_text()).get("attacks", [])):
            if (a.get("name") in peers or a.get("view") == "peer") and any(
                    a.get(k) == "granted" for k in GRANT_PARAMS):
                found.append(f"{path.relative_to(ROOT)}: attacks[{i}] grants a peer")
    assert not found, "\n".join(found)
