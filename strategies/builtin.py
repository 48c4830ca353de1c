"""Flower's built-in Message-API strategies, registered under fl-sim names.

Each factory takes only the algorithm's own hyper-parameters (keyword-only, validated from the
signature by :meth:`fl_sim.registry.Registry.create`) and returns the stock Flower strategy.
Node sampling is NOT configured here: fl-sim samples clients deterministically per
``(seed, round)`` in its outermost tap wrapper (:mod:`fl_sim.federation.taps`) and hands the
wrapped strategy a grid that lists only the sampled nodes, so every strategy is built with
``fraction_*=1.0`` and ``min_*_nodes=1``.
"""

from typing import Annotated, Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from pydantic import Field

from fl_sim.capabilities import strategy_capabilities_of
from fl_sim.registry import STRATEGIES

Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Unit = Annotated[float, Field(ge=0.0, lt=1.0)]

#: what the aggregation is (fl_sim.capabilities): FedAvg and FedProx move the global by the
#: weighted mean of the deltas; FedAvgM / FedAdam / FedYogi / FedAdagrad take a server
#: optimiser step on that mean; the robust ones (median, trimmed mean, Krum) are no mean
MEAN_STEP = strategy_capabilities_of(weighted_mean_of_updates=True, global_is_mean_step=True)
MEAN_THEN_OPTIMISER = strategy_capabilities_of(weighted_mean_of_updates=True)

#: Sampling arguments every wrapped strategy gets (sampling happens in the tap wrapper).
SAMPLE_ALL: dict[str, Any] = {"fraction_train": 1.0, "fraction_evaluate": 1.0,
                              "min_train_nodes": 1, "min_evaluate_nodes": 1,
                              "min_available_nodes": 1}


@STRATEGIES.register("fedavg")
@MEAN_STEP
def fedavg() -> FedAvg:
    """FedAvg (McMahan et al., 2017): weighted mean of the clients' new weights."""
    return FedAvg(**SAMPLE_ALL)


@STRATEGIES.register("fedprox")
@MEAN_STEP
def fedprox(*, proximal_mu: NonNegative = 0.01) -> FedProx:
    """FedProx (Li et al., 2020): FedAvg; clients add (mu/2)·||w − w_global||² locally."""
    return FedProx(**SAMPLE_ALL, proximal_mu=proximal_mu)


@STRATEGIES.register("fedavgm")
@MEAN_THEN_OPTIMISER
def fedavgm(*, server_learning_rate: Positive = 1.0,
            server_momentum: Unit = 0.9) -> FedAvgM:
    """FedAvgM (Hsu et al., 2019): server SGD with momentum on the mean pseudo-gradient."""
    return FedAvgM(**SAMPLE_ALL, server_learning_rate=server_learning_rate,
                   server_momentum=server_momentum)


@STRATEGIES.register("fedadam")
@MEAN_THEN_OPTIMISER
def fedadam(*, eta: Positive = 1e-1, eta_l: Positive = 1e-1, beta_1: Unit = 0.9,
            beta_2: Unit = 0.99, tau: Positive = 1e-3) -> FedAdam:
    """FedAdam (Reddi et al., 2021): server Adam on the mean pseudo-gradient."""
    return FedAdam(**SAMPLE_ALL, eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)


@STRATEGIES.register("fedyogi")
@MEAN_THEN_OPTIMISER
def fedyogi(*, eta: Positive = 1e-2, eta_l: Positive = 0.0316, beta_1: Unit = 0.9,
            beta_2: Unit = 0.99, tau: Positive = 1e-3) -> FedYogi:
    """FedYogi (Reddi et al., 2021): server Yogi on the mean pseudo-gradient."""
    return FedYogi(**SAMPLE_ALL, eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)


@STRATEGIES.register("fedadagrad")
@MEAN_THEN_OPTIMISER
def fedadagrad(*, eta: Positive = 1e-1, eta_l: Positive = 1e-1, tau: Positive = 1e-3) -> FedAdagrad:
    """FedAdagrad (Reddi et al., 2021): server Adagrad on the mean pseudo-gradient."""
    return FedAdagrad(**SAMPLE_ALL, eta=eta, eta_l=eta_l, tau=tau)


@STRATEGIES.register("fedmedian")
def fedmedian() -> FedMedian:
    """FedMedian (Yin et al., 2018): coordinate-wise median of the clients' weights."""
    return FedMedian(**SAMPLE_ALL)


@STRATEGIES.register("fedtrimmedavg")
def fedtrimmedavg(*, beta: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.2) -> FedTrimmedAvg:
    """FedTrimmedAvg (Yin et al., 2018): coordinate-wise mean after cutting both tails."""
    return FedTrimmedAvg(**SAMPLE_ALL, beta=beta)


@STRATEGIES.register("krum")
def krum(*, num_malicious_nodes: Annotated[int, Field(ge=0)] = 0) -> Krum:
    """Krum (Blanchard et al., 2017): the update closest to its n − f − 2 neighbours."""
    return Krum(**SAMPLE_ALL, num_malicious_nodes=num_malicious_nodes)
