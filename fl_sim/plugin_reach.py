"""Refuse, before a run starts, plug-ins that the run's other processes could not load.

A plug-in registered only by running its decorator (in a notebook cell, a script, or a module
that the driver imported but nobody installed) exists in the driver's registry alone. Flower's
Ray client actors and the Deployment Engine's SuperNodes are other processes: they fill their
registries from fl-sim's packages and from installed entry points, so such a plug-in passes
the driver's config check and then every client fails ("unknown defense ...") after the run
directory exists. :func:`check_plugins_reach_workers` turns that into one line before anything
is written, saying how to install the plug-in.

Why refuse rather than ship the definitions to the workers: Ray's runtime environment
(``py_modules``, ``working_dir``) ships modules that exist as files, not classes defined in a
notebook's ``__main__``; the client app looks plug-ins up by name in a fresh process that
would also have to import the shipped module; and the Deployment Engine's SuperNodes are not
Ray processes at all. An installed package with an entry point works the same in all three
engines (simulation, ``fl-sim deploy-local``, ``flwr run .``), so that is the one way.
"""

from __future__ import annotations

from typing import Any

from fl_sim.config import ExperimentConfig
from fl_sim.errors import PluginError
from fl_sim.registry import (
    ATTACKS,
    DATA_SOURCES,
    DEFENSES,
    MODELS,
    PARTITIONERS,
    STRATEGIES,
    TASKS,
    Registry,
    entry_point_group,
)

#: Plug-ins that only Flower's client processes use under the simulation engine; attacks and
#: strategies run in the driver's ServerApp there, so a notebook attack works in ``api.run``.
CLIENT_SIDE = ("data", "partition", "model", "task", "defenses")


def _sections(cfg: ExperimentConfig) -> list[tuple[str, str, Registry[Any]]]:
    return [("data", cfg.data.name, DATA_SOURCES), ("partition", cfg.partition.name, PARTITIONERS),
            ("model", cfg.model.name, MODELS), ("task", cfg.task.name, TASKS),
            ("strategy", cfg.strategy.name, STRATEGIES),
            *(("attacks", a.name, ATTACKS) for a in cfg.attacks),
            *(("defenses", d.name, DEFENSES) for d in cfg.defenses)]


def check_plugins_reach_workers(cfg: ExperimentConfig, *, engine: str = "simulation") -> None:
    """Raise :class:`~fl_sim.errors.PluginError` (one line) for the first plug-in of ``cfg``
    that another process of ``engine`` would need but could not load.

    ``engine``: ``"simulation"`` (Ray actors: the client-side plug-ins of
    :data:`CLIENT_SIDE`) or ``"deployment"`` (SuperLink + SuperNodes: every plug-in).
    """
    for section, name, registry in _sections(cfg):
        if engine == "simulation" and section not in CLIENT_SIDE:
            continue
        if not registry.installed(name):
            raise PluginError(not_installed_message(registry, name, engine))


def check_attack_installed(name: str) -> None:
    """For attack cells run as Ray tasks (``fl-sim bench --workers N``): the same check."""
    if not ATTACKS.installed(name):
        raise PluginError(not_installed_message(ATTACKS, name, "Ray tasks"))


def not_installed_message(registry: Registry[Any], name: str, engine: str) -> str:
    obj = registry.get(name)
    module = getattr(obj, "__module__", "?")
    value = f"{module if module != '__main__' else 'your_package.module'}:" \
            f"{getattr(obj, '__qualname__', name)}"
    return (f"{registry.kind} '{name}' is registered only in this process ({module}), so "
            f"the {engine} processes cannot load it; install it as a plug-in: a package whose "
            f"pyproject.toml has [project.entry-points.\"{entry_point_group(registry.kind)}\"] "
            f"{name} = \"{value}\", then `pip install -e PATH` (see docs/PLUGINS.md)")
