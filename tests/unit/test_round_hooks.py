"""The server loop runs the hooks it is given (issue 19 item 4), without Ray.

:func:`~fl_sim.federation.server_app.run_server` runs over a hand-built grid (two nodes that
answer the partition query and reply ``global + 0.5`` to every train message) on a tiny
digits/MLP config. A recording hook placed after the default hooks must see, at the end of
round r: the round's metrics line already written, the checkpoint of round r, and the new
global; a resumed run must start its hooks at the first round not done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_sim.config import from_dict
from fl_sim.federation import protocol as P
from fl_sim.federation import server_app
from fl_sim.federation.checkpoint import CheckpointStore
from fl_sim.federation.hooks import RoundContext, RoundHook, default_hooks
from fl_sim.federation.server_app import ServerSetup, run_server
from fl_sim.report import read_metrics

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = (7, 9)
OFFSET = 0.5


class _Grid:
    """Two nodes: partition query -> ``node index``; train -> ``arrays + OFFSET``. Replies
    are ready at once (the loop pushes, then pulls: :class:`~fl_sim.federation.lifecycle.
    StoppableGrid`)."""

    def __init__(self) -> None:
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.replies.extend(self._reply(m) for m in messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        out, self.replies = self.replies, []
        return out

    @staticmethod
    def _reply(m: Message) -> Message:
        cid = NODES.index(int(m.metadata.dst_node_id))
        if m.metadata.message_type == P.QUERY_PARTITION:
            return Message(RecordDict({P.META: ConfigRecord({P.PARTITION_ID: cid})}),
                           reply_to=m)
        arrays = next(iter(m.content.array_records.values()))
        return Message(RecordDict({
            P.ARRAYS: ArrayRecord({k: Array(a.numpy() + np.float32(OFFSET))
                                   for k, a in arrays.items()}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: 4, "train-loss": 1.0}),
            P.META: ConfigRecord({P.PARTITION_ID: cid, "local-steps": 1, "batch-size": 4,
                                  "lr": 0.1})}), reply_to=m)


class _Recorder(RoundHook):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.seen: dict[int, dict[str, Any]] = {}

    def on_run_start(self, ctx: RoundContext) -> None:
        self.events.append(("run_start", ctx.start_round))

    def on_round_start(self, ctx: RoundContext) -> None:
        self.events.append(("round_start", ctx.server_round))

    def on_round_end(self, ctx: RoundContext) -> None:
        self.events.append(("round_end", ctx.server_round))
        ck = CheckpointStore(ctx.run_dir).load()
        self.seen[ctx.server_round] = {
            "metrics_rounds": [m["round"] for m in read_metrics(ctx.run_dir)],
            "checkpoint_round": ck.server_round if ck else None,
            "global": ctx.global_tensors()}

    def on_run_end(self, ctx: RoundContext) -> None:
        self.events.append(("run_end", ctx.server_round))


def _cfg(num_rounds: int) -> Any:
    return from_dict({"data": {"name": "digits", "image_size": 8, "max_train": 40,
                               "max_test": 10},
                      "model": {"name": "mlp", "hidden": [8]},
                      "federation": {"num_clients": 2, "num_rounds": num_rounds,
                                     "fraction_train": 1.0, "fraction_evaluate": 0.0,
                                     "local_steps": 1, "batch_size": 4},
                      "strategy": {"name": "fedavg"}})


def test_hooks_run_in_order_after_the_round_is_written_and_resume_skips_done_rounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the run's closing plots and report.html (matplotlib, ~5 s each) are not under test
    monkeypatch.setattr(server_app, "plot_metrics", lambda run_dir: None)
    monkeypatch.setattr(server_app, "_write_report", lambda run_dir: None)
    rec = _Recorder()
    cfg = _cfg(2)
    run_server(_Grid(), ServerSetup(cfg, tmp_path, hooks=[*default_hooks(cfg), rec]))
    assert rec.events == [("run_start", 0), ("round_start", 1), ("round_end", 1),
                          ("round_start", 2), ("round_end", 2), ("run_end", 2)]
    for r in (1, 2):  # the default hooks ran before the recorder, in that round
        assert rec.seen[r]["metrics_rounds"] == list(range(1, r + 1))
        assert rec.seen[r]["checkpoint_round"] == r
    for k, v in rec.seen[2]["global"].items():  # FedAvg of two replies: + OFFSET a round
        if v.is_floating_point():
            torch.testing.assert_close(v, rec.seen[1]["global"][k] + OFFSET)

    more = _Recorder()  # resume the same run to 3 rounds: only round 3 runs
    cfg3 = _cfg(3)
    run_server(_Grid(), ServerSetup(cfg3, tmp_path, resume=True,
                                    hooks=[*default_hooks(cfg3), more]))
    assert more.events == [("run_start", 2), ("round_start", 3), ("round_end", 3),
                           ("run_end", 3)]
    assert more.seen[3]["metrics_rounds"] == [1, 2, 3]
    for k, v in more.seen[3]["global"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, rec.seen[2]["global"][k] + OFFSET)
