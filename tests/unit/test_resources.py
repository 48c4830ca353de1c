"""Client resources and devices (run.device, federation.client_resources), without a GPU.

The GPU cases run against described nodes (``Node(cpus, gpus)``): what Flower's backend is
given for a cuda config, and the one-line errors raised before Ray starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from fl_sim import cli
from fl_sim.config import ExperimentConfig, from_dict
from fl_sim.errors import ConfigError, FlSimError
from fl_sim.federation import resources
from fl_sim.federation.resources import Node, plan_resources

ROOT = Path(__file__).resolve().parents[2]
CPU_BOX = [Node(cpus=2, gpus=0)]
GPU_BOX = [Node(cpus=16, gpus=1)]


def cfg(device: str = "cpu", **res: float) -> ExperimentConfig:
    return from_dict({"run": {"device": device},
                      "federation": {"client_resources": res}}, check_plugins=False)


@pytest.mark.parametrize(("device", "res", "nodes", "match"), [
    ("cuda", {}, CPU_BOX, "run.device = 'cuda' but this machine has no CUDA GPU"),
    ("cuda", {"num_gpus": 0}, GPU_BOX, "num_gpus = 0 reserves no GPU"),
    ("cpu", {"num_gpus": 1}, CPU_BOX, r"num_gpus = 1\) cannot be satisfied"),
    ("auto", {"num_gpus": 0.5}, CPU_BOX, r"num_gpus = 0.5\) cannot be satisfied"),
    ("cpu", {"num_cpus": 3}, CPU_BOX, r"num_cpus = 3, num_gpus = 0\) cannot be satisfied: "
     "this machine has 2 CPU / 0 GPU"),
    ("cuda", {"num_gpus": 2}, GPU_BOX, "cannot be satisfied"),
    # an actor cannot span nodes: 2 GPUs in the cluster, but 1 per node
    ("cuda", {"num_gpus": 2}, [Node(4, 1), Node(4, 1)],
     "has 4 CPU / 1 GPU, 4 CPU / 1 GPU per node"),
])
def test_impossible_resources_are_one_line_config_errors(device, res, nodes, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        plan_resources(cfg(device, **res), nodes, driver_gpus=int(nodes[0].gpus))
    assert "\n" not in str(info.value)


def test_cuda_without_num_gpus_shares_the_gpu_among_as_many_actors_as_cpus_allow() -> None:
    plan = plan_resources(cfg("cuda"), GPU_BOX, driver_gpus=1)
    assert (plan.num_cpus, plan.num_gpus) == (1.0, 0.0625)   # 16 actors on one GPU
    assert (plan.client_device, plan.server_device) == ("cuda", "cuda")
    plan = plan_resources(cfg("cuda", num_cpus=4), [Node(16, 2)], driver_gpus=2)
    assert plan.num_gpus == 0.5                                # 4 actors on 2 GPUs
    explicit = plan_resources(cfg("cuda", num_gpus=0.25), GPU_BOX, driver_gpus=1)
    assert explicit.num_gpus == 0.25


def test_auto_never_splits_clients_on_cpu_from_a_server_on_gpu() -> None:
    on_gpu = plan_resources(cfg("auto"), GPU_BOX, driver_gpus=1)
    assert (on_gpu.client_device, on_gpu.server_device, on_gpu.num_gpus) == \
        ("cuda", "cuda", 0.0625)
    no_reservation = plan_resources(cfg("auto", num_gpus=0), GPU_BOX, driver_gpus=1)
    assert (no_reservation.client_device, no_reservation.server_device) == ("cpu", "cpu")
    assert "num_gpus = 0 reserves no GPU" in no_reservation.reason
    no_gpu = plan_resources(cfg("auto"), CPU_BOX, driver_gpus=0)
    assert (no_gpu.client_device, no_gpu.server_device, no_gpu.num_gpus) == ("cpu", "cpu", 0)
    # a CPU driver of a GPU cluster: clients on GPU, server on CPU, and the log says so
    remote = plan_resources(cfg("cuda"), [Node(0, 0), Node(8, 4)], driver_gpus=0,
                            where="the Ray cluster at 127.0.0.1:6379")
    assert (remote.client_device, remote.server_device, remote.num_gpus) == \
        ("cuda", "cpu", 0.5)
    assert "the driver sees no GPU" in remote.reason


def test_backend_config_of_a_cuda_config_reserves_gpus(monkeypatch) -> None:
    from fl_sim.federation.simulation import backend_config
    monkeypatch.setattr(resources, "local_node", lambda: Node(cpus=8, gpus=2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    resolved, plan = resources.prepare_resources(cfg("cuda", num_cpus=2))
    assert backend_config(resolved)["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert resolved.federation.client_resources.num_gpus == 0.5 == plan.num_gpus
    assert resources.server_device(resolved).type == ("cuda" if torch.cuda.is_available()
                                                      else "cpu")
    cpu_resolved, _ = resources.prepare_resources(cfg("cpu"))
    assert backend_config(cpu_resolved)["client_resources"] == {"num_cpus": 1.0,
                                                                 "num_gpus": 0.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU-only error")
def test_client_asked_for_cuda_without_a_visible_gpu_raises() -> None:
    resolved = cfg("cuda", num_gpus=0.5)
    with pytest.raises(FlSimError, match="this client process sees no GPU"):
        resources.client_device(resolved)
    assert resources.client_device(cfg("auto", num_gpus=0)).type == "cpu"
    assert resources.server_device(resolved).type == "cpu"


def test_determinism_sets_the_cublas_workspace(monkeypatch) -> None:
    calls: list[tuple[bool, bool]] = []   # the real call costs ~7 s in a fresh process here
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, *, warn_only=False: calls.append((mode, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    resources.apply_determinism(from_dict({"run": {"deterministic": True}},
                                          check_plugins=False))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert calls == [(True, True)]
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")   # a user's value is kept
    resources.apply_determinism(from_dict({"run": {"deterministic": False}},
                                          check_plugins=False))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert calls[-1] == (False, True) and not torch.backends.cudnn.deterministic


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU-only errors")
@pytest.mark.parametrize(("overrides", "match"), [
    (["run.device='cuda'"], "run.device = 'cuda' but this machine has no CUDA GPU"),
    (["federation.client_resources.num_gpus=1"], "cannot be satisfied"),
    ([f"federation.client_resources.num_cpus={(os.cpu_count() or 1) + 1}"],
     "cannot be satisfied"),
])
def test_cli_refuses_before_ray_starts(overrides, match, tmp_path, capsys) -> None:
    sets = [x for o in overrides for x in ("--set", o)]
    t0 = time.perf_counter()
    code = cli.main(["run", str(ROOT / "configs" / "default.toml"), *sets,
                     "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fl-sim: error: ") and match in err
    assert not (tmp_path / "run").exists()          # no run directory left behind
    assert time.perf_counter() - t0 < 10            # no Ray start-up (~15 s) before the error
    import ray
    assert not ray.is_initialized()
