"""A config's dataset and per-client partitions, loaded once per process.

A leaf module: the ClientApp (its private data), the ServerApp (its test split), SecAgg+
(the largest partition bounds ``max_weight``) and the canary examples all read the data
through it, so none of them has to import another to reach the data (no import circle).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from fl_sim.data import load_data, partition_dataset


@lru_cache(maxsize=2)
def load_splits(data_json: str) -> Any:
    """The dataset of a config's ``data`` section (JSON of :func:`section_json`), loaded
    once per process."""
    section = json.loads(data_json)
    name = section.pop("name")
    return load_data(name, **section)


@lru_cache(maxsize=2)
def load_partitions(data_json: str, partition_json: str, num_clients: int, seed: int
                    ) -> tuple[Any, ...]:
    """Per-client index arrays into the train split, computed once per process."""
    section = json.loads(partition_json)
    name = section.pop("name")
    return tuple(partition_dataset(load_splits(data_json).train, name, num_clients, seed=seed,
                                   **section))


def section_json(section: Any) -> str:
    """A config section as canonical JSON (the cache key of the loaders above)."""
    return json.dumps(section.model_dump(mode="json"), sort_keys=True)
