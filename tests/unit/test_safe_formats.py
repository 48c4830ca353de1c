"""Only safe model formats are loaded: a pickle planted as a prior, a pretrained UNet or an
identity model is refused by name and never executed.

Each payload's ``__reduce__`` creates a marker directory when unpickled (checked first on a
copy, so the test would notice a payload that does nothing); every case then asserts the
one-line refusal AND that the marker was not created.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from fl_sim.errors import DataError
from fl_sim.identity import META_FILE, load_identity, train_identity
from fl_sim.models import build_model
from fl_sim.priors import METADATA_FILE, load_prior, save_prior
from fl_sim.tasks.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: code execution, observable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def _payload(marker: Path) -> bytes:
    raw = pickle.dumps(_Payload(marker))
    probe = marker.with_name(marker.name + "-probe")
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload really runs when unpickled
    assert probe.is_dir()
    return raw


def _unet(seed: int = 0) -> torch.nn.Module:
    return build_model("unet", 1, 10, 8, seed=seed, params={"preset": "tiny"})


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_pickled_prior_is_refused_unexecuted(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler
    marker = tmp_path / "pwned"
    prior = save_prior(tmp_path / "prior", _unet(), DDPMScheduler(num_train_timesteps=10),
                       metadata={})
    unet = prior / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(_payload(marker))
    meta = json.loads((prior / METADATA_FILE).read_text())  # digests forged to match
    meta["digests"] = {"unet/config.json": _sha(unet / "config.json"),
                       "unet/diffusion_pytorch_model.bin":
                           _sha(unet / "diffusion_pytorch_model.bin")}
    (prior / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"diffusion_pytorch_model\.bin: refusing a pickled "
                                        r"checkpoint.*safetensors\.torch\.save_file") as err:
        load_prior(prior)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.pt", "weights.pkl"])
def test_pickled_pretrained_unet_is_refused_unexecuted(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "pretrained"
    _unet().save_config(d)
    (d / name).write_bytes(_payload(marker))
    with pytest.raises(DataError, match=f"{name}: refusing a pickled checkpoint"):
        load_pretrained(_unet(seed=1), d)
    assert not marker.exists()


def test_a_pickle_beside_safetensors_weights_is_never_read(tmp_path: Path) -> None:
    # use_safetensors=True: diffusers has no fallback to the .bin even if it were preferred
    marker = tmp_path / "pwned"
    d = tmp_path / "pretrained"
    _unet(seed=3).save_pretrained(d)
    (d / "diffusion_pytorch_model.bin").write_bytes(_payload(marker))
    model = _unet(seed=1)
    load_pretrained(model, d)
    assert torch.equal(next(iter(model.state_dict().values())),
                       next(iter(_unet(seed=3).state_dict().values())))
    assert not marker.exists()


def test_pickled_identity_model_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "identity"
    d.mkdir()
    (d / META_FILE).write_text(json.dumps({"format": "fl-sim-identity", "in_channels": 1,
                                           "num_classes": 2, "image_size": 8}))
    (d / "identity.pt").write_bytes(_payload(marker))
    with pytest.raises(DataError, match=r"identity\.pt \(a pickle.*safetensors\.torch\."
                                        r"save_file"):
        load_identity(d)
    assert not marker.exists()


def test_identity_weights_that_are_not_safetensors_are_one_data_error(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    x = torch.rand(8, 1, 8, 8)
    d = train_identity(x, torch.arange(8) % 2, tmp_path / "identity", epochs=1)
    assert load_identity(d).gallery.shape == (8, 64)  # the safetensors round trip
    (d / "identity.safetensors").write_bytes(_payload(marker))  # a pickle under the safe name
    with pytest.raises(DataError, match="not a valid fl-sim identity model"):
        load_identity(d)
    assert not marker.exists()
