"""The sections of an experiment config (``[run]``, ``[data]``, ``[federation]``, one
``[[attacks]]`` entry, ...): typed, frozen pydantic models that reject unknown keys.

:class:`fl_sim.config.ExperimentConfig` holds them; :mod:`fl_sim.config` loads, overrides and
validates a whole config and re-exports every section, so ``from fl_sim.config import
FederationConfig`` keeps working. Split from :mod:`fl_sim.config` along this seam (sections /
the whole config and its loading) to keep both short.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from fl_sim.errors import PluginError
from fl_sim.registry import ATTACKS
from fl_sim.strict import StrictNumbers
from fl_sim.view_types import VIEWS

if TYPE_CHECKING:
    from fl_sim.records import LocalOptimizer

__all__ = ["AttackConfig", "AuditConfig", "ClientResources", "DataConfig", "DefenseConfig",
           "FederationConfig", "MetricsConfig", "ModelConfig", "PartitionConfig", "RunConfig",
           "SamplesConfig", "StrategyConfig", "TaskConfig", "declared_view"]


class _Section(StrictNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _PluginSection(StrictNumbers):
    """A section that names a plug-in (``name``) and carries its params as extra keys."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(_Section):
    name: str = "default"
    seed: int = Field(0, ge=0)
    output_dir: str = "runs"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    deterministic: bool = True


class DataConfig(_PluginSection):
    name: str = "digits"


class PartitionConfig(_PluginSection):
    name: str = "iid"
    max_samples_per_client: int | None = Field(None, ge=1)


class ModelConfig(_PluginSection):
    """``pretrained``: a prior directory (``fl-sim train-prior``) or a diffusers UNet directory
    whose weights the federation starts from (checked against the model before Ray starts)."""

    name: str = "lenet"
    pretrained: str | None = None


class TaskConfig(_PluginSection):
    name: str = "classifier"


class StrategyConfig(_PluginSection):
    name: str = "fedavg"


class ClientResources(_Section):
    """What Ray reserves per client actor. ``num_gpus`` unset: 0 on CPU, a share of the GPUs
    with ``run.device = "cuda"``/``"auto"`` (see :mod:`fl_sim.federation.resources`)."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float | None = Field(None, ge=0)


class FederationConfig(_Section):
    num_clients: int = Field(4, ge=1)
    num_rounds: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(0.0, ge=0, le=1)
    local_epochs: int | None = Field(None, ge=1)
    local_steps: int | None = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    #: the local optimiser's other settings (torch's defaults; fresh state every round):
    #: ``momentum`` for sgd only, ``weight_decay`` for both, ``adam_betas``/``adam_eps``
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    client_failure_rate: float = Field(0.0, ge=0, lt=1)
    peer_clients: tuple[int, ...] = ()
    record_truth: bool = True
    taps: bool = True
    #: retention: record (taps, ground truth, peer records) only these rounds / clients
    #: (None: all); see fl_sim/federation/retention.py
    record_rounds: tuple[int, ...] | None = None
    record_clients: tuple[int, ...] | None = None
    client_resources: ClientResources = ClientResources()
    ray_address: str | None = None

    @model_validator(mode="after")
    def _retention(self) -> FederationConfig:
        if self.record_rounds is not None and (not self.record_rounds or min(
                self.record_rounds) < 1):
            raise ValueError(f"record_rounds {list(self.record_rounds)}: rounds count from 1 "
                             "(omit record_rounds to record every round)")
        bad = [c for c in self.record_clients or () if not 0 <= c < self.num_clients]
        if bad or self.record_clients == ():
            raise ValueError(f"record_clients {bad or []} outside 0..{self.num_clients - 1} "
                             "(omit record_clients to record every client)")
        return self

    @model_validator(mode="after")
    def _optimizer_settings(self) -> FederationConfig:
        if self.optimizer != "sgd" and self.momentum:
            raise ValueError(f"momentum = {self.momentum} is an sgd setting; optimizer = "
                             f"{self.optimizer!r} (adam: adam_betas, adam_eps)")
        if self.optimizer != "adam" and (self.adam_betas != (0.9, 0.999)
                                         or self.adam_eps != 1e-8):
            raise ValueError(f"adam_betas / adam_eps are adam settings; optimizer = "
                             f"{self.optimizer!r}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas {list(self.adam_betas)}: each must lie in [0, 1)")
        return self

    def local_optimizer(self) -> LocalOptimizer:
        """The optimiser every client builds each round (what the records carry)."""
        from fl_sim.records import LocalOptimizer  # lazy: torch only when asked
        return LocalOptimizer(self.optimizer, momentum=self.momentum,
                              weight_decay=self.weight_decay, betas=self.adam_betas,
                              eps=self.adam_eps)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FederationConfig:
        if self.local_epochs is not None and self.local_steps is not None:
            # local_steps has a default; an explicit local_epochs wins over it.
            object.__setattr__(self, "local_steps", None)
        bad = [c for c in self.peer_clients if not 0 <= c < self.num_clients]
        if bad:
            raise ValueError(f"peer_clients {bad} outside 0..{self.num_clients - 1}")
        return self


class MetricsConfig(_Section):
    """How reconstructions are scored (PSNR/SSIM/MSE/label accuracy always).

    ``lpips_weights``: a LOCAL file with the full LPIPS state dict; LPIPS is computed only
    when it is given (and the optional ``lpips`` package is installed) -- never downloaded.
    """

    lpips_weights: str | None = None
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    #: directory of an identity classifier (`fl-sim train-identity`): adds identity_top1,
    #: identity_correct, sim_own, sim_others to each result whose truth is one identity
    identity_model: str | None = None

    @model_validator(mode="after")
    def _identity_model_exists(self) -> MetricsConfig:
        if self.identity_model is not None and not (
                Path(self.identity_model) / "identity.json").is_file():
            raise ValueError(f"identity_model = {self.identity_model!r}: not an identity model "
                             "directory (no identity.json; train one with `fl-sim "
                             "train-identity`)")
        return self

    @model_validator(mode="after")
    def _lpips_available(self) -> MetricsConfig:
        if self.lpips_weights is not None:
            # lazy: keeps scipy, torch out of this module's import
            from fl_sim.metrics import (
                lpips_available,  # lazy: metrics load torch and scipy; a config loads without them
            )
            if not lpips_available(self.lpips_weights):
                missing = ("the weights file" if not Path(self.lpips_weights).is_file()
                           else "the optional 'lpips' package (pip install 'fl-sim[lpips]')")
                raise ValueError(f"LPIPS needs {missing}; lpips_weights = "
                                 f"{self.lpips_weights!r} (nothing is downloaded)")
        return self


class AttackConfig(_PluginSection):
    """One ``[[attacks]]`` entry. ``view`` omitted (or null) takes the attack's own declared
    view (``peer_inversion`` -> ``"peer"``); the resolved value is what ``config.json`` holds."""

    #: "aggregate": the server's sum of the round (all a SecAgg+ server has)
    view: Literal["server", "peer", "aggregate"] = "server"
    client: int | None = None
    rounds: tuple[int, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _view_of_the_attack(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("view") is None and "name" in data:
            data = {**data, "view": declared_view(data["name"])}
        return data


def declared_view(attack: Any) -> str:
    """The view attack ``attack`` declares (``"server"`` for a name the registry does not
    know: the plug-in check reports that one)."""
    try:
        view = getattr(ATTACKS.get(str(attack)), "view", "server")
    except PluginError:
        return "server"
    return view if view in VIEWS and VIEWS[view].declarable else "server"


class DefenseConfig(_PluginSection):
    pass


class AuditConfig(_PluginSection):
    """One ``[[audits]]`` entry: a registered audit (``fl-sim list audits``) and its params."""


class SamplesConfig(_Section):
    """Per-round DDIM samples of the global model, for diffusion tasks only
    (``RUN_DIR/samples/r0003.png``, same noise every round): ``num_images`` (0 = none),
    ``num_inference_steps``, ``every`` (rounds; the last round always gets a grid), ``ema``
    (0 = grids of the global model; a decay in (0, 1) = grids of an exponential moving
    average of the global models over rounds, DDPM practice, see
    :class:`fl_sim.samples.SamplingEMA`)."""

    num_images: int = Field(16, ge=0)
    num_inference_steps: int = Field(25, ge=1)
    every: int = Field(1, ge=1)
    ema: float = Field(0.0, ge=0, lt=1)
