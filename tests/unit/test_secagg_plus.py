"""secagg_plus without Ray: documented defaults run alone, bad parameters and impossible
combinations are one line before anything starts, the client mods are no-ops elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fl_sim.config import from_dict
from fl_sim.defended import check_defenses
from fl_sim.federation.secagg import SECAGG_MODS


def test_defaults_run_alone() -> None:
    cfg = from_dict({"federation": {"num_clients": 4}, "defenses": [{"name": "secagg_plus"}]})
    check_defenses(cfg)  # no problem with 4 sampled clients
    (d,) = cfg.defenses
    assert d.name == "secagg_plus"


@pytest.mark.parametrize(("fed", "strategy", "params", "words"), [
    ({"num_clients": 4, "fraction_train": 0.25}, "fedavg", {}, "at least 2 sampled clients"),
    ({"num_clients": 5}, "fedavg", {"num_shares": 3, "reconstruction_threshold": 4},
     "below num_shares 3"),
    ({"num_clients": 10, "fraction_train": 0.3}, "fedavg",
     {"num_shares": 5, "reconstruction_threshold": 4}, "threshold 4 exceeds the 3 clients"),
    ({"num_clients": 4}, "fedavg", {"num_shares": 2}, "num_shares as an integer"),
    ({"num_clients": 4}, "fedavg", {"clipping_range": -1.0}, "defenses[0].clipping_range"),
    ({"num_clients": 4}, "fedavg", {"modulus_range": 1000}, "power of 2"),
    ({"num_clients": 4, "local_steps": 2, "batch_size": 8}, "fedavg", {"max_weight": 10.0},
     "max_weight 10 is below the 16 examples"),
    ({"num_clients": 4}, "krum", {}, "needs the individual updates"),
])
def test_bad_params_are_one_line_before_anything_starts(tmp_path: Path, capsys: object,
                                                         fed: dict, strategy: str,
                                                         params: dict, words: str) -> None:
    from fl_sim import cli
    lines = "".join(f"{k} = {v!r}\n" for k, v in params.items())
    fed_lines = "".join(f"{k} = {v!r}\n" for k, v in fed.items())
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[model]\nname = "mlp"\n[federation]\n{fed_lines}[strategy]\n'
                   f'name = "{strategy}"\n[[defenses]]\nname = "secagg_plus"\n{lines}')
    code = cli.main(["run", str(cfg), "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert code == 2 and err.count("\n") == 1 and err.startswith("fl-sim: error: "), err
    assert words in err and not (tmp_path / "r").exists(), err


def test_central_dp_is_refused() -> None:
    from fl_sim.errors import ConfigError
    cfg = from_dict({"defenses": [{"name": "secagg_plus"}, {"name": "central_dp"}]})
    with pytest.raises(ConfigError, match="cannot be combined with central_dp"):
        check_defenses(cfg)


@pytest.mark.usefixtures("flower_task_identity")
def test_client_mods_are_no_ops_without_secagg() -> None:
    """A plaintext train message passes both mods untouched (same object to the app)."""
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"x": 1})})
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    seen = []

    def app(m: Message, c: Context) -> str:
        seen.append(m)
        return "reply"

    ctx = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for mod in SECAGG_MODS:
        assert mod(msg, ctx, app) == "reply"
    assert seen == [msg, msg] and msg.content is content


# -- the protocol in-process (no Ray): Flower's workflow and client mod over a local grid --
class _LocalGrid:
    """Delivers each message to its node's mod chain (a copy, as a real transport would)."""

    def __init__(self, train: object, nodes: list[int]) -> None:
        self.train = train
        self.ctx = {n: Context(run_id=0, node_id=n, node_config={}, state=RecordDict(),
                               run_config={}) for n in nodes}

    def send_and_receive(self, messages: list[Message], timeout: object = None) -> list:
        import copy

        from fl_sim.federation.flower_compat import secagg_bridge, secagg_mod
        out = []
        for m in messages:
            n = m.metadata.dst_node_id
            msg = Message(copy.deepcopy(m.content), dst_node_id=n,
                          message_type=m.metadata.message_type)
            out.append(secagg_mod(msg, self.ctx[n], lambda x, c: secagg_bridge(
                x, c, self.train)))  # type: ignore[arg-type]
        return out


def _run(kind: str, updates: dict[int, dict[str, np.ndarray]], weights: dict[int, int],
         global_state: dict[str, np.ndarray], drop: tuple[int, ...] = ()
         ) -> tuple[dict[str, np.ndarray], list]:
    import torch
    from flwr.app import Array, MetricRecord

    from fl_sim.federation import protocol as P
    from fl_sim.federation.flower_compat import fitins_of, mean_reply, run_secaggplus
    from fl_sim.registry import DEFENSES

    def train(msg: Message, ctx: Context) -> Message:
        n = msg.metadata.dst_node_id
        if n in drop:  # train fails: fl-sim's error reply (failures_as_replies)
            from flwr.app import Error
            return Message(Error(code=0, reason="boom"), reply_to=msg)
        g = {k: a.numpy() for k, a in msg.content.array_records[P.ARRAYS].items()}
        assert all(np.array_equal(g[k], global_state[k]) for k in g)  # names survive
        arrays = updates[n] if kind == P.GRADIENT else {
            k: np.asarray(g[k] + updates[n][k], dtype=g[k].dtype) for k in g}
        return Message(RecordDict({
            P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: weights[n], "train-loss": float(n)}),
            P.META: ConfigRecord({P.UPDATE_KIND_KEY: kind})}), reply_to=msg)

    arrays = ArrayRecord({k: Array(v) for k, v in global_state.items()})
    config = ConfigRecord({P.UPDATE_KIND_KEY: kind} if kind == P.GRADIENT else {})
    ins = Message(RecordDict({P.ARRAYS: arrays, "config": config}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    fitins = {n: fitins_of(ins, seed=n) for n in updates}
    defense = DEFENSES.create("secagg_plus", _where="test")
    results = run_secaggplus(_LocalGrid(train, list(updates)), defense,
                             float(max(weights.values())), 1, arrays, fitins)
    reply = mean_reply(results, {k: torch.from_numpy(v) for k, v in global_state.items()},
                       fitins[next(iter(fitins))])
    return {k: a.numpy() for k, a in reply.content.array_records[P.ARRAYS].items()}, results


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("kind", ["gradient", "weights"])
def test_unmasked_mean_is_the_weighted_mean_of_updates(kind: str) -> None:
    """FedSGD (gradients) and FedAvg (weights, masked as ``reply − global``): what the server
    unmasks is ``Σ n_k u_k / Σ n_k`` within :func:`error_bound`; integer buffers round back."""

    from defenses.secagg_plus import error_bound
    rng = np.random.default_rng(0)
    glob = {"w": rng.normal(size=(5, 3)).astype(np.float32) * 20,  # weights beyond ±8
            "n": np.array(7, dtype=np.int64)}
    nodes = [11, 22, 33, 44]
    weights = {11: 8, 22: 3, 33: 8, 44: 5}
    updates = {n: {"w": rng.normal(size=(5, 3)).astype(np.float32) * 0.1,
                   "n": np.array(2, dtype=np.int64)} for n in nodes}
    if kind == "gradient":  # a FedSGD gradient covers the parameters only, no buffers
        updates = {n: {"w": u["w"]} for n, u in updates.items()}
    out, results = _run("gradient" if kind == "gradient" else "delta", updates, weights, glob)
    total = sum(weights.values())
    mean = sum(weights[n] * updates[n]["w"].astype(np.float64) for n in nodes) / total
    expect = mean if kind == "gradient" else glob["w"] + mean
    bound = error_bound(len(nodes), total / max(weights.values()))
    assert np.abs(out["w"] - expect).max() <= bound + 1e-5 * np.abs(expect).max()
    assert np.abs(out["w"] - expect).max() > 0  # it really went through quantisation
    assert sorted(n for n, _ in results) == nodes
    assert sum(r.num_examples for _, r in results) == total
    if kind == "gradient":
        assert set(out) == {"w"}
    else:
        assert out["n"].dtype == np.int64 and int(out["n"]) == 9


@pytest.mark.usefixtures("flower_task_identity")
def test_a_client_that_fails_drops_out_and_the_rest_are_unmasked() -> None:
    """Node 22's train fails at the masking stage: the protocol removes its pairwise masks
    from the others' shares and unmasks the mean of the three that completed."""
    from defenses.secagg_plus import error_bound
    rng = np.random.default_rng(1)
    glob = {"w": np.zeros((4,), dtype=np.float32)}
    updates = {n: {"w": rng.normal(size=4).astype(np.float32)} for n in (11, 22, 33, 44)}
    weights = dict.fromkeys(updates, 4)
    out, results = _run("gradient", updates, weights, glob, drop=(22,))
    assert sorted(n for n, _ in results) == [11, 33, 44]
    expect = np.mean([updates[n]["w"] for n in (11, 33, 44)], axis=0)
    assert np.abs(out["w"] - expect).max() <= error_bound(3, 3.0) + 1e-6
