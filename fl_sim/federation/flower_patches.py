"""One targeted fix to Flower's simulation engine, so that a round costs what it samples.

Flower's (1.41 / 1.42) simulation runtime moves messages to the Ray workers with a thread
that, every 0.1 s, asks the in-memory LinkState for a message for EVERY node
(``vce_api.add_messages_to_queue``), and each of those calls scans every stored message. A
sweep therefore costs ``population × messages in flight``: with 1,000 nodes and 100 sampled
clients, ~10⁵ message checks per sweep, holding the GIL while the server waits; node
discovery (one query to each of 1,000 nodes) took minutes. ``benchmarks/scale.py`` measured it.

:func:`install` replaces that loop with one that first collects the destinations of the
messages not yet delivered (one pass over the store) and asks the LinkState only for those
nodes, in the same node order, with the same ``get_message_ins`` call (so Flower's expiry and
federation checks and its "delivered" marking are unchanged). Other LinkStates (no
``message_ins_store``) keep Flower's loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from queue import Queue
from typing import Any

logger = logging.getLogger(__name__)

_ORIGINAL: dict[str, Callable[..., None]] = {}


def pending_destinations(store: Mapping[str, Any]) -> set[int]:
    """Destination node ids of the messages in ``store`` not yet delivered."""
    return {int(m.metadata.dst_node_id) for m in list(store.values())
            if m.metadata.delivered_at == ""}


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int],
                          f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue``, asking only nodes with a pending message."""
    store = getattr(state, "message_ins_store", None)
    if not isinstance(store, dict):
        _ORIGINAL["add_messages_to_queue"](state, queue, nodes_mapping, f_stop)
        return
    lock = getattr(state, "lock", None)
    while not f_stop.is_set():
        if lock is not None:
            with lock:
                pending = pending_destinations(store)
        else:
            pending = pending_destinations(store)
        if pending:
            for node_id in nodes_mapping:
                if node_id in pending:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
        f_stop.wait(0.1)


def install() -> bool:
    """Patch Flower's simulation runtime (idempotent); False if its layout is unknown."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    current = getattr(vce_api, "add_messages_to_queue", None)
    if current is add_messages_to_queue:
        return True
    if current is None or not hasattr(vce_api, "run_api"):
        logger.warning("Flower's simulation runtime changed; message dispatch left as is")
        return False
    _ORIGINAL["add_messages_to_queue"] = current
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
