"""Client resources and devices: what each Ray client actor reserves, checked before Ray starts.

:func:`prepare_resources` turns ``run.device`` and ``federation.client_resources`` into a
:class:`ResourcePlan` against the machine (or, with ``federation.ray_address``, the nodes of
the running cluster) and returns the config with ``num_gpus`` filled in. It raises a one-line
:class:`~fl_sim.errors.ConfigError` BEFORE Ray starts whenever the simulation could not run:
Flower's actor pool would be empty and the run would wait for its clients forever.

Rules (docs/how-to/gpus.md):

* ``run.device = "cpu"``: clients and server on CPU; ``num_gpus`` unset means 0.
* ``"cuda"``: a GPU must exist (locally, or on a cluster node); ``num_gpus`` unset means
  :func:`default_gpu_fraction` (the GPUs shared by as many actors as the CPUs allow, so the
  GPU never lowers concurrency); ``num_gpus = 0`` is refused — Ray sets
  ``CUDA_VISIBLE_DEVICES=""`` in an actor that reserves no GPU, so clients could never see one.
* ``"auto"``: ``"cuda"`` when a GPU exists and ``num_gpus`` is not 0, else CPU for clients AND
  server (never clients on CPU beside a server on GPU). The choice is logged.
* always: one client's ``num_cpus`` and ``num_gpus`` must fit on ONE node (an actor cannot
  span nodes).

:func:`client_device` / :func:`server_device` read the resolved config; :func:`apply_determinism`
sets the CUDA determinism knobs where ``run.deterministic`` asks for them.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fl_sim.config import ExperimentConfig
from fl_sim.errors import ConfigError, FlSimError

logger = logging.getLogger(__name__)

#: cuBLAS needs a fixed workspace for bit-reproducible GEMMs (PyTorch's reproducibility notes).
CUBLAS_WORKSPACE = ":4096:8"
_WHERE = "federation.client_resources"


@dataclass(frozen=True)
class Node:
    """Schedulable resources of one Ray node (or of this machine before Ray starts)."""

    cpus: float
    gpus: float


@dataclass(frozen=True)
class ResourcePlan:
    """What each client actor reserves and where clients and server compute."""

    num_cpus: float
    num_gpus: float
    client_device: str
    server_device: str
    reason: str


def local_node() -> Node:
    """This machine as a local Ray would see it (Ray's CPU count honours cgroup quotas)."""
    try:
        from ray._private.utils import get_num_cpus  # lazy: keeps ray out of this module's import
        cpus = float(get_num_cpus())
    except Exception:  # ray's private helper moved: fall back to the OS count
        cpus = float(os.cpu_count() or 1)
    return Node(cpus=cpus, gpus=float(torch.cuda.device_count()))


def cluster_nodes(address: str) -> list[Node]:
    """The alive nodes of the Ray cluster at ``address`` (connects, reads, disconnects).

    Raises :class:`~fl_sim.errors.ConfigError` if no cluster answers there.
    """
    import ray  # lazy: keeps ray out of this module's import
    try:
        with warnings.catch_warnings():  # ray's FutureWarning about accelerator env vars
            warnings.simplefilter("ignore")
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as exc:  # ConnectionError, or ray's own errors
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"--ray-address {address}: no Ray cluster reachable there "
                          f"({type(exc).__name__}: {first})") from None
    try:
        return [Node(cpus=float(n["Resources"].get("CPU", 0)),
                     gpus=float(n["Resources"].get("GPU", 0)))
                for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    finally:
        ray.shutdown()


def default_gpu_fraction(nodes: Sequence[Node], num_cpus: float) -> float:
    """GPUs per actor so that GPUs never cap concurrency: on each GPU node
    ``gpus / floor(cpus / num_cpus)`` (at most 1), the smallest over nodes, rounded DOWN to
    1e-4 so that the fractions of all actors sum to no more than the GPUs.

    >>> default_gpu_fraction([Node(cpus=16, gpus=1)], 1.0)
    0.0625
    >>> default_gpu_fraction([Node(cpus=3, gpus=1)], 1.0)
    0.3333
    """
    fractions = [min(1.0, n.gpus / max(1, math.floor(n.cpus / num_cpus)))
                 for n in nodes if n.gpus > 0]
    return math.floor(min(fractions) * 1e4) / 1e4 if fractions else 0.0


def plan_resources(cfg: ExperimentConfig, nodes: Sequence[Node], *, driver_gpus: int,
                   where: str = "this machine") -> ResourcePlan:
    """The :class:`ResourcePlan` of ``cfg`` on ``nodes`` (see module doc); pure.

    ``driver_gpus``: GPUs the driver process (the server) sees. Raises ConfigError.
    """
    res, device = cfg.federation.client_resources, cfg.run.device
    total_gpus = sum(n.gpus for n in nodes)
    num_gpus = res.num_gpus
    if device == "cuda" and total_gpus == 0:
        raise ConfigError(f"run.device = 'cuda' but {where} has no CUDA GPU (torch sees "
                          f"{driver_gpus}); use run.device = 'cpu' or 'auto'")
    if device == "cuda" and num_gpus == 0:
        raise ConfigError(f"run.device = 'cuda' but {_WHERE}.num_gpus = 0 reserves no GPU, and "
                          "Ray hides GPUs from such actors; set num_gpus > 0 (a fraction "
                          "shares a GPU, e.g. 0.25) or leave it unset")
    use_gpu = device == "cuda" or (device == "auto" and total_gpus > 0 and num_gpus != 0)
    if num_gpus is None:
        num_gpus = default_gpu_fraction(nodes, res.num_cpus) if use_gpu else 0.0
    _check_fits(res.num_cpus, num_gpus, nodes, where)
    client = "cuda" if use_gpu else "cpu"
    server = "cuda" if use_gpu and driver_gpus > 0 else "cpu"
    reason = (f"run.device = {device!r}: clients on {client} ({_WHERE}: num_cpus = "
              f"{res.num_cpus:g}, num_gpus = {num_gpus:g}), server on {server}")
    if device == "auto" and not use_gpu:
        reason += (" (no GPU on " + where + ")" if total_gpus == 0
                   else f" ({_WHERE}.num_gpus = 0 reserves no GPU)")
    if server != client:
        reason += " (the driver sees no GPU)"
    if device == "cpu" and num_gpus > 0:
        reason += "; GPUs are reserved but run.device = 'cpu' does not use them"
    return ResourcePlan(float(res.num_cpus), float(num_gpus), client, server, reason)


def _check_fits(num_cpus: float, num_gpus: float, nodes: Sequence[Node], where: str) -> None:
    if any(num_cpus <= n.cpus and num_gpus <= n.gpus for n in nodes):
        return
    have = ", ".join(f"{n.cpus:g} CPU / {n.gpus:g} GPU" for n in nodes) or "no nodes"
    raise ConfigError(f"{_WHERE} (num_cpus = {num_cpus:g}, num_gpus = {num_gpus:g}) cannot be "
                      f"satisfied: {where} has {have} per node; lower them")


def prepare_resources(cfg: ExperimentConfig) -> tuple[ExperimentConfig, ResourcePlan]:
    """Plan ``cfg``'s resources (see module doc); returns the config with ``num_gpus`` set.

    Local Ray: checked against this machine, before Ray starts. ``federation.ray_address``:
    against the cluster's nodes (a short connection). Raises ConfigError.
    """
    address = cfg.federation.ray_address
    if address:
        nodes, where = cluster_nodes(address), f"the Ray cluster at {address}"
    else:
        nodes, where = [local_node()], "this machine"
    plan = plan_resources(cfg, nodes, driver_gpus=torch.cuda.device_count(), where=where)
    logger.info("%s", plan.reason)
    fed = cfg.federation
    resources = fed.client_resources.model_copy(update={"num_gpus": plan.num_gpus})
    resolved = cfg.model_copy(update={"federation": fed.model_copy(
        update={"client_resources": resources})})
    return resolved, plan


def backend_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Flower's ``backend_config["client_resources"]`` of a resolved config."""
    res = cfg.federation.client_resources
    return {"num_cpus": float(res.num_cpus), "num_gpus": float(res.num_gpus or 0.0)}


def _uses_gpu(cfg: ExperimentConfig) -> bool:
    gpus = cfg.federation.client_resources.num_gpus
    return cfg.run.device == "cuda" or (cfg.run.device == "auto" and bool(gpus))


def client_device(cfg: ExperimentConfig) -> torch.device:
    """Where a client trains: cuda iff the resolved config reserves GPUs for clients
    (``"auto"`` with ``num_gpus > 0``, or ``"cuda"``). Raises FlSimError if that GPU is not
    visible in this process (e.g. a SuperNode without GPU)."""
    if not _uses_gpu(cfg):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FlSimError(f"run.device = {cfg.run.device!r} with {_WHERE}.num_gpus = "
                         f"{cfg.federation.client_resources.num_gpus} but this client "
                         f"process sees no GPU (CUDA_VISIBLE_DEVICES = "
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return torch.device("cuda")


def server_device(cfg: ExperimentConfig) -> torch.device:
    """Where the server evaluates: the clients' device, or CPU if the driver has no GPU (a
    CPU driver of a GPU cluster; logged by :func:`prepare_resources`)."""
    if _uses_gpu(cfg) and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def apply_determinism(cfg: ExperimentConfig) -> None:
    """``run.deterministic``: deterministic torch kernels (warn where none exists), cuDNN
    without benchmarking, and ``CUBLAS_WORKSPACE_CONFIG`` (set before cuBLAS starts; an
    existing value is kept)."""
    det = bool(cfg.run.deterministic)
    if det:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(det, warn_only=True)
    torch.backends.cudnn.deterministic = det
    torch.backends.cudnn.benchmark = not det and torch.backends.cudnn.benchmark

