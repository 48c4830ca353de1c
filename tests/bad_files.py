"""Corrupt and malformed data files for the bad-input table (tests/unit/test_bad_inputs.py).

Each builder writes one broken file (or directory) under ``tmp`` and returns its path.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np


# -- files the cases are built from ----------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _images(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def _labels(n: int = 40) -> np.ndarray:
    return np.arange(n) % 4


def _npz(tmp: Path, **arrays: np.ndarray) -> Path:
    p = tmp / "data.npz"
    np.savez_compressed(p, **arrays)
    return p


def _npz_members(tmp: Path, members: dict[str, bytes]) -> Path:
    p = tmp / "data.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return p


def corrupt_stream(tmp: Path) -> Path:
    """Valid zip directory and .npy header, garbage in the middle of x's deflate stream."""
    p = _npz(tmp, x=np.random.default_rng(1).integers(0, 256, (400, 16, 16), np.uint8),
             y=np.arange(400) % 4)
    raw = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    mid = start + info.compress_size // 2
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
    p.write_bytes(bytes(raw))
    return p


def malformed_header(tmp: Path) -> Path:
    x = bytearray(_npy(_images()))
    x[10:30] = b"{'descr': ((((((((((("[:20]
    return _npz_members(tmp, {"x.npy": bytes(x), "y.npy": _npy(_labels())})


def huge_header(tmp: Path) -> Path:
    hdr = "{'descr': '|u1', 'fortran_order': False, 'shape': (100000000000, 8, 8), }"
    hdr = hdr.ljust(117) + "\n"
    x = b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr.encode() + bytes(64)
    return _npz_members(tmp, {"x.npy": x, "y.npy": _npy(_labels())})


def huge_label(tmp: Path) -> Path:
    y = _labels()
    y[-1] = 10**9
    return _npz(tmp, x=_images(), y=y)


def negative_label(tmp: Path) -> Path:
    y = _labels()
    y[3] = -1
    return _npz(tmp, x=_images(), y=y)


def nan_images(tmp: Path) -> Path:
    x = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    return _npz(tmp, x=x, y=_labels())


def truncated_zip(tmp: Path) -> Path:
    p = _npz(tmp, x=_images(), y=_labels())
    p.write_bytes(p.read_bytes()[:300])
    return p


def wrong_keys(tmp: Path) -> Path:
    return _npz(tmp, images=_images(), targets=_labels())


def object_array(tmp: Path) -> Path:
    p = tmp / "data.npz"
    np.savez(p, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    return p


def corrupt_png(tmp: Path) -> Path:
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        (tmp / "imgs" / cls / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    return tmp / "imgs"


def bad_idx(tmp: Path) -> Path:
    root = tmp / "mnist"
    root.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (root / name).write_bytes(b"\x00\x00\x08\x03" + (10**6).to_bytes(4, "big") * 3)
    return root


# -- model directories and outputs of the newer commands (train-prior, train-identity, bench) --
class PicklePayload:
    """Unpickling this calls ``os.mkdir(marker)``: a pickle that runs code, observably."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os
        return os.mkdir, (str(self.marker),)


def pickled_pretrained(tmp: Path) -> Path:
    """A diffusers UNet directory (the 16x16 tiny preset) whose weights are a pickle."""
    import pickle

    from fl_sim.models import build_model
    d = tmp / "pretrained"
    build_model("unet", 1, 10, 16, seed=0, params={"preset": "tiny"}).save_config(d)
    (d / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(PicklePayload(tmp / "pwned")))
    return d


def config_only_pretrained(tmp: Path) -> Path:
    """A diffusers UNet directory with config.json and no weights at all."""
    from fl_sim.models import build_model
    d = tmp / "pretrained"
    build_model("unet", 1, 10, 16, seed=0, params={"preset": "tiny"}).save_config(d)
    return d


def pickled_identity(tmp: Path) -> Path:
    """An identity-model directory whose weights are a pickle (identity.pt)."""
    import json
    import pickle
    d = tmp / "identity"
    d.mkdir()
    (d / "identity.json").write_text(json.dumps({"format": "fl-sim-identity", "in_channels": 1,
                                                 "num_classes": 2, "image_size": 8}))
    (d / "identity.pt").write_bytes(pickle.dumps(PicklePayload(tmp / "pwned")))
    return d


def prior_with_state(tmp: Path, config: Path, state: str) -> Path:
    """A train-prior output of ``config`` whose checkpoint/state.json holds ``state``."""
    import json

    from fl_sim.train_prior import CONFIG_FILE, prior_config
    d = tmp / "prior"
    (d / "checkpoint").mkdir(parents=True)
    (d / CONFIG_FILE).write_text(json.dumps(prior_config(config).to_json_dict()))
    (d / "checkpoint" / "state.json").write_text(state)
    return d


def grid(tmp: Path, base: Path, *, bench: str = "", axes: str = "",
         attack: str = 'name = "inverting_gradients"') -> Path:
    """A bench grid over ``base`` (one round) with ``[bench]`` extras, ``[axes]`` lines and
    one ``[[attacks]]`` entry."""
    p = tmp / "grid.toml"
    p.write_text(f'[bench]\nbase = "{base}"\nset = ["federation.num_rounds=1"]\n{bench}\n'
                 f"[axes]\n{axes}\n[[attacks]]\n{attack}\n")
    return p
