"""secagg_plus without Ray: documented defaults run alone, bad parameters and impossible
combinations are one line before anything starts, the client mods are no-ops elsewhere."""

from __future__ import annotations

from pathlib import Path

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
