"""What travels in Flower messages between fl-sim's ServerApp and ClientApp.

``run_simulation`` hands apps an EMPTY ``run_config``, so the resolved experiment config
travels inside every message's ConfigRecord (:data:`CONFIG_KEY`, JSON) together with the run
directory (:data:`RUN_DIR_KEY`). A train reply carries exactly one ArrayRecord (``arrays``),
one MetricRecord (``metrics``: ``num-examples`` + ``train-loss``; Flower weight-averages every
key) and one ConfigRecord (``meta``: ids and hyper-parameters, never averaged).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord

from fl_sim.config import ExperimentConfig, from_dict

CONFIG_KEY = "fl-sim-config"
RUN_DIR_KEY = "fl-sim-run-dir"
ROUND_KEY = "server-round"          # set by Flower's FedAvg.configure_train
UPDATE_KIND_KEY = "update-kind"     # GRADIENT (FedSGD) or absent (weights)
GRADIENT = "gradient"
#: FedSGD under central DP: the client replies the one-step weights global − η·gradient
#: (η = SERVER_LR_KEY), see strategies/fedsgd.py
SGD_STEP = "sgd-step"
SERVER_LR_KEY = "server-lr"
PROXIMAL_MU_KEY = "proximal-mu"     # set by Flower's FedProx.configure_train
#: What the server published about the previous round's aggregation (a curious peer uses it).
AGG_ROUND_KEY = "aggregated-round"
AGG_NUM_EXAMPLES_KEY = "aggregated-num-examples"
AGG_NUM_CLIENTS_KEY = "aggregated-num-clients"
#: Robustness/test knob (never set by a config): client ids whose update is replaced by NaN.
POISON_KEY = "fl-sim-poison-clients"
POISON_ENV = "FL_SIM_POISON_CLIENTS"

ARRAYS = "arrays"
METRICS = "metrics"
META = "meta"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"

QUERY_PARTITION = "query.partition"
QUERY_FINAL_MODEL = "query.final_model"


def config_record(cfg: ExperimentConfig, run_dir: Path | str, **extra: Any) -> ConfigRecord:
    """A ConfigRecord carrying the resolved config and the run directory."""
    return ConfigRecord({CONFIG_KEY: json.dumps(cfg.to_json_dict(), sort_keys=True),
                         RUN_DIR_KEY: str(run_dir), **extra})


def read_config(record: ConfigRecord) -> tuple[ExperimentConfig, Path]:
    """``(config, run_dir)`` from a ConfigRecord made by :func:`config_record` (cached)."""
    return _parse(str(record[CONFIG_KEY])), Path(str(record[RUN_DIR_KEY]))


@lru_cache(maxsize=4)
def _parse(text: str) -> ExperimentConfig:
    return from_dict(json.loads(text))
