"""iDLG as an attack: labels only, from the last layer's gradient.

Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv:2001.02610, 2020
(single image); for batches the bias-corrected count method of
:mod:`attacks.components.label_recovery` (Yin et al. 2021; Geng et al. 2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from attacks.base import Attack, Reconstruction
from attacks.components.gradients import attack_task
from attacks.components.label_recovery import recover_labels
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS


@ATTACKS.register("idlg")
class IDLG(Attack):
    """iDLG label recovery (Zhao et al. 2020): returns labels, no images.

    ``method``: ``"idlg"`` (batch of one), ``"batch"`` (bias-corrected counts) or ``"auto"``.
    ``model_mode``: the train/eval mode the client's forward pass is assumed to have used
    (matters for BatchNorm only). Raises ``ValueError`` for iDLG on a batch of several images.
    """

    view = "server"
    #: the label trick reads ONE client's last-layer gradient (not an aggregate's)
    needs_client_update = True
    tasks = ("classifier",)

    @classmethod
    def max_images_per_update(cls, params: Mapping[str, Any]) -> tuple[int, str] | None:
        """``method = "idlg"`` reads the label of ONE image (``"auto"`` / ``"batch"``: any)."""
        if params.get("method") == "idlg":
            return 1, "method = 'idlg' recovers the label of ONE image (use 'auto' or 'batch')"
        return None

    def __init__(self, *, method: Literal["auto", "idlg", "batch"] = "auto",
                 model_mode: Literal["eval", "train"] = "eval", num_dummy: int = 16) -> None:
        if num_dummy < 1:
            raise ConfigError(f"num_dummy must be >= 1, got {num_dummy}")
        self.method = method
        self.model_mode = model_mode
        self.num_dummy = num_dummy

    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        """Labels ``[B]`` (sorted) of the record's batch; images ``[0, C, H, W]``."""
        task = attack_task(record, self.model_mode, device=self.device)
        labels = recover_labels(record, self.method, task=task, generator=generator,
                                num_dummy=self.num_dummy)
        spec = record.spec
        method = self.method if self.method != "auto" else (
            "idlg" if labels.numel() == 1 else "batch")
        return Reconstruction(
            images=torch.empty(0, spec.in_channels, spec.image_size, spec.image_size),
            labels=labels,
            # What the analytic recovery relies on beyond the transmitted update.
            knowledge={"labels": method, "num_images": int(labels.numel()),
                     "batchnorm": self.model_mode},
            extras={"label_method": method})
