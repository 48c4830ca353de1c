"""Retention (record only some rounds / clients) and run.seed driving the data split."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fl_sim.config import from_dict
from fl_sim.errors import ConfigError
from fl_sim.federation.retention import Retention


def _cfg(attacks: list[dict[str, Any]] | None = None, **fed: Any):  # noqa: ANN202
    return from_dict({"federation": {"num_clients": 4, "num_rounds": 5, "peer_clients": [0],
                                     **fed}, "attacks": attacks or []})


def test_retention_from_config_and_peer_globals() -> None:
    keep = Retention.of(_cfg(record_rounds=[2, 4], record_clients=[1]).federation)
    assert [r for r in range(1, 7) if keep.round(r)] == [2, 4]
    assert [r for r in range(1, 7) if keep.peer_global(r)] == [2, 3, 4, 5]
    assert [(r, c) for r in range(1, 6) for c in range(4) if keep.client_round(r, c)] == \
        [(2, 1), (4, 1)]
    every = Retention.of(_cfg().federation)
    assert every.round(99) and every.client_round(99, 3) and every.peer_global(1)


@pytest.mark.parametrize(("fed", "attack", "needle"), [
    ({"record_rounds": [2]}, {"name": "noop", "client": 1}, "round(s) [1] not recorded"),
    ({"record_rounds": [2]}, {"name": "noop", "client": 1, "rounds": [2, 3]},
     "round(s) [3] not recorded"),
    ({"record_clients": [1]}, {"name": "noop"}, "name its client"),
    ({"record_clients": [1]}, {"name": "noop", "client": 2}, "client 2 not recorded"),
    ({"record_clients": [1]}, {"name": "noop", "view": "peer"}, "every other client"),
])
def test_attacks_on_unrecorded_rounds_or_clients_fail_validation_in_one_line(
        fed: dict[str, Any], attack: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg([attack], **fed)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_recorded_attacks_validate_and_bad_retention_is_refused() -> None:
    cfg = _cfg([{"name": "noop", "client": 1, "rounds": [2]},
                {"name": "noop", "view": "peer", "rounds": [2]}], record_rounds=[2])
    assert cfg.federation.record_rounds == (2,)
    _cfg([{"name": "noop", "client": 1}], record_clients=[1, 3])
    for bad in ({"record_rounds": [0]}, {"record_rounds": []}, {"record_clients": [4]},
                {"record_clients": []}):
        with pytest.raises(ConfigError):
            _cfg(**bad)


def test_run_seed_drives_the_train_test_split_unless_data_seed_is_set() -> None:
    from fl_sim.data import load_data

    def split(raw: dict[str, Any]) -> torch.Tensor:
        raw = {**raw, "data": {"image_size": 8, **raw.get("data", {})}}  # no upsampling: fast
        data = from_dict(raw).data.model_dump()
        name = data.pop("name")
        return load_data(name, max_train=50, max_test=10, **{
            k: v for k, v in data.items() if k not in ("max_train", "max_test")}).test.labels

    assert from_dict({"run": {"seed": 7}}).data.model_dump()["seed"] == 7
    assert from_dict({"run": {"seed": 7}, "data": {"seed": 1}}).data.model_dump()["seed"] == 1
    assert not torch.equal(split({"run": {"seed": 1}}), split({"run": {"seed": 2}}))
    assert torch.equal(split({"run": {"seed": 1}, "data": {"seed": 5}}),
                       split({"run": {"seed": 2}, "data": {"seed": 5}}))
    # a source with a fixed split (no seed parameter) is left alone
    assert "seed" not in from_dict({"run": {"seed": 7}, "data": {
        "name": "mnist", "path": "x"}}, check_plugins=False).data.model_dump()
