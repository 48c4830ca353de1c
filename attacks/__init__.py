"""Attack plug-ins: one file per published method, registered in ``fl_sim.registry.ATTACKS``.

Imports torch/numpy and fl_sim's plain-data modules only -- never flwr or ray (a test checks).
"""

from __future__ import annotations

import importlib

from attacks.base import Attack, Reconstruction

__all__ = ["Attack", "Reconstruction"]

# Each module registers its attack on import. Listed explicitly: a newcomer sees every attack.
_MODULES = ("noop", "idlg", "dlg", "inverting_gradients", "peer_inversion", "gidm",
            "gidm_plus", "peer_diffusion_prior", "gias", "user_level_diffusion",
            "mia_gradient", "mia_lira", "mia_rmia", "property_inference")

for _name in _MODULES:
    try:
        importlib.import_module(f"attacks.{_name}")
    except ModuleNotFoundError as _exc:  # module not written yet during development
        if _exc.name != f"attacks.{_name}":
            raise
