"""File-format readers behind the data sources: npz, idx (MNIST), CIFAR pickle, image folders.

Each reader returns plain numpy arrays and raises :class:`~fl_sim.errors.DataError` whose
message starts with the offending file and says what is wrong with it. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fl_sim.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Most classes a label array may imply (ImageNet-21k has ~22 k); one corrupt label of 1e9
#: must fail here, not size a model head with a billion outputs.
MAX_CLASSES = 100_000
_IMAGES_EXPECTED = "expected uint8 [N, H, W, C] / [N, H, W] or float [N, C, H, W] in [0, 1]"


def require_file(path: Path) -> Path:
    """``path`` if it is an existing file, else :class:`DataError`."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    return path


def require_dir(path: Path) -> Path:
    """``path`` if it is an existing directory, else :class:`DataError`."""
    if not path.exists():
        raise DataError(f"{path}: directory not found")
    if not path.is_dir():
        raise DataError(f"{path}: not a directory")
    return path


# -- array validation -----------------------------------------------------------------------
def check_images(x: np.ndarray, where: str) -> np.ndarray:
    """Validate an image array; return uint8 [N, H, W, C] or float32 [N, C, H, W] in [0, 1].

    ``where`` names the file (and key) in error messages. Raises :class:`DataError` for a
    wrong dtype or rank, NaNs, values outside [0, 1], float NHWC, or zero images.
    """
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise DataError(f"{where}: images of rank {x.ndim} (shape {x.shape}); "
                            f"{_IMAGES_EXPECTED}")
    elif x.dtype.kind == "f":
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise DataError(f"{where}: images of rank {x.ndim} (shape {x.shape}); "
                            f"{_IMAGES_EXPECTED}")
        if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            raise DataError(f"{where}: float images of shape {x.shape} look channels-last; "
                            "float images must be [N, C, H, W]")
        if x.size and not np.isfinite(x).all():
            raise DataError(f"{where}: images contain NaN or infinite values")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise DataError(f"{where}: float images outside [0, 1] (min {x.min():.4g}, "
                            f"max {x.max():.4g})")
        x = x.astype(np.float32, copy=False)
    else:
        hint = " (convert to uint8)" if x.dtype.kind in "iub" else ""
        raise DataError(f"{where}: images of dtype {x.dtype}{hint}; {_IMAGES_EXPECTED}")
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise DataError(f"{where}: empty (image array of shape {x.shape})")
    return x


def check_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Validate integer class labels of shape [N] (or [N, 1]); return int64 [N].

    Raises :class:`DataError` for a non-integer dtype, another rank, negatives, a label of
    ``MAX_CLASSES`` or more, or no labels.
    """
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels of dtype {y.dtype}; expected integers")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: labels of rank {y.ndim} (shape {y.shape}); expected [N]")
    if y.shape[0] == 0:
        raise DataError(f"{where}: empty (no labels)")
    if y.min() < 0:
        raise DataError(f"{where}: negative label {int(y.min())}")
    if int(y.max()) >= MAX_CLASSES:
        raise DataError(f"{where}: label {int(y.max())} would mean {int(y.max()) + 1} classes; "
                        f"labels must be 0..K-1 with K <= {MAX_CLASSES}")
    return y.astype(np.int64, copy=False)


def check_pair(x: np.ndarray, y: np.ndarray, where: str) -> None:
    """Raise :class:`DataError` unless there is one label per image."""
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: {x.shape[0]} images but {y.shape[0]} labels")


# -- npz ------------------------------------------------------------------------------------
def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, loaded without pickle (object arrays are refused).

    Every member's ``.npy`` header is checked first (:func:`check_npy_headers`), so a header
    that claims more data than the member holds fails here instead of allocating it. Raises
    :class:`DataError` for anything unreadable: not a zip, a corrupt compressed stream, a
    malformed header, an object array.
    """
    require_file(path)
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a valid .npz file (not a zip archive)")
    try:
        check_npy_headers(path)
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(f"{path}: unreadable array ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, SyntaxError) as exc:
        raise DataError(f"{path}: not a valid .npz file ({exc})") from None


def check_npy_headers(path: Path) -> None:
    """Raise :class:`DataError` unless each ``.npy`` member of the zip ``path`` has a valid
    header whose shape x dtype matches the member's stored (uncompressed) size.

    Only the headers are read (a few hundred bytes each), never the arrays.
    """
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            where = f"{path} [{info.filename[:-4]}]"
            with zf.open(info) as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                except Exception as exc:  # noqa: BLE001 -- numpy's parser raises many kinds
                    raise DataError(f"{where}: unreadable .npy header "
                                    f"({type(exc).__name__}: {exc})") from None
                header_bytes = fh.tell()
            if dtype.hasobject:
                raise DataError(f"{where}: unreadable array: an object array needs pickle, "
                               "which is refused")
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            stored = info.file_size - header_bytes
            if declared != stored:
                raise DataError(f"{where}: header says shape {shape} of {dtype} "
                                f"({declared} bytes) but the file holds {stored} bytes")


# -- idx (MNIST) ----------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """One idx file (LeCun's MNIST format, optionally ``.gz``) as an array of rank ``ndim``.

    Raises :class:`DataError` for a bad magic number, wrong rank or dtype, or a size that
    does not match the header.
    """
    require_file(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00":
        raise DataError(f"{path}: not an idx file (bad magic number)")
    code, rank = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown idx dtype code 0x{code:02x}")
    if _IDX_DTYPES[code] != np.uint8:
        raise DataError(f"{path}: idx dtype {_IDX_DTYPES[code]}; expected unsigned bytes")
    if rank != ndim:
        raise DataError(f"{path}: idx rank {rank}; expected {ndim}")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says {dims} = {expected} bytes but file holds "
                        f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx(root: Path, stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz``; :class:`DataError` naming both when neither exists."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / stem}: file not found (nor {stem}.gz)")


# -- CIFAR-10 python batches ----------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays: the CIFAR batches need nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                # how Python 3 writes bytes at protocol 2 (e.g. re-saved batches)
                ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 [N, 32, 32, 3], int64 [N]).

    The published format is a pickled dict (``b"data"``: uint8 [N, 3072] in CHW order,
    ``b"labels"``); it is read with a numpy-only unpickler, from the user's own path only.
    """
    require_file(path)
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'; got {keys}")
    data = np.asarray(batch[b"data"])
    labels = check_labels(np.asarray(batch[b"labels"]), str(path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}; expected uint8 "
                        "[N, 3072]")
    check_pair(data, labels, str(path))
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def find_cifar_dir(path: Path) -> Path:
    """``path`` itself or ``path/cifar-10-batches-py``, whichever holds ``test_batch``."""
    require_dir(path)
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file():
            return candidate
    raise DataError(f"{path}: no CIFAR-10 python batches (test_batch) here or in "
                    "cifar-10-batches-py/")


# -- image folders --------------------------------------------------------------------------
def class_dirs(root: Path) -> list[Path]:
    """Sorted class sub-directories of ``root``; :class:`DataError` when there are none."""
    require_dir(root)
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: empty (no class sub-directories)")
    return dirs


def read_image_folder(root: Path, class_names: list[str], *, channels: int | None,
                      image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Images under ``root/<class>/`` -> (uint8 [N, S, S, C], int64 [N]).

    Labels are positions in ``class_names``. Each image is centre-cropped to a square and, if
    ``image_size`` is given, resized (Lanczos; decoded at a reduced size first when much
    larger: :func:`_square_image`). ``channels=None`` keeps gray if every image is gray, else
    RGB. Raises :class:`DataError` for an unreadable image, differing sizes without
    ``image_size``, or no images at all.
    """
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(class_names):
        folder = root / name
        if folder.is_dir():
            files += [(p, label) for p in sorted(folder.iterdir())
                      if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{root}: empty (no {'/'.join(IMAGE_SUFFIXES)} images in class "
                        "sub-directories)")
    if channels is None:  # the headers say the modes; nothing is decoded yet
        modes = [_read_image(p, lambda im: im.mode) for p, _ in files]
        channels = 1 if all(m in ("1", "L", "I", "I;16", "F") for m in modes) else 3
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"{root}: channels={channels} not supported; use 1 or 3")
    arrays = [_read_image(p, lambda im: _square_image(im, mode, image_size)) for p, _ in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{root}: images of different sizes {sorted(shapes)[:3]}; set "
                        "image_size")
    x = np.stack(arrays)
    return (x if x.ndim == 4 else x[..., None]), np.array([lab for _, lab in files], np.int64)


def _read_image(path: Path, read: Any) -> Any:
    """``read(image)`` of the opened image file ``path``; :class:`DataError` if unreadable."""
    from PIL import Image, UnidentifiedImageError  # lazy: keeps Pillow out of this module's import

    try:
        with Image.open(path) as im:
            return read(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


#: an image at least this many times the target size is decoded reduced (JPEG: DCT scaling,
#: ``Image.draft``) and box-reduced by an integer factor (``Image.reduce``) before the final
#: Lanczos step, which then still shrinks by >= this factor (Pillow's ``reducing_gap``)
REDUCING_GAP = 3.0


def _square_image(im: Any, mode: str, size: int | None) -> np.ndarray:
    """The centre square of the unloaded image ``im`` in ``mode``, resized to ``size`` (uint8
    [S, S] or [S, S, C]).

    Deviation from a plain full-size Lanczos resize (kept within a few grey levels): a large
    image is decoded at a reduced size (JPEG) and box-reduced before the Lanczos step
    (:data:`REDUCING_GAP`). Measured 2026-12-07 (CPU, 2 cores, shared/loaded, load 8-9):
    200 generated photograph-like 1024 x 896 JPEGs (quality 90) read at 64 px in 2.0-2.5 s
    against 6.4-8.7 s for the full-size path (3-4x; 5 runs of each), 40 such PNGs 1.6-2.0 s
    against 2.5-3.0 s (PNG decodes at full size; only the reduce step is saved); pixels
    differ from the full-size path by at most 2 (mean 0.19) at 1024 -> 64 and at most 6
    (mean 0.54) for 300 x 263 JPEGs at 32 px (command: a script generating the files, then
    ``read_image_folder`` of both versions; the test's bound is in
    tests/unit/test_data_sources.py). Only reduced images are held: the full-size path kept
    every decoded image (550 MB for these 200) until all were read.
    """
    from PIL import Image  # lazy: keeps Pillow out of this module's import

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if size is None or size == s:
        return np.asarray(im.convert(mode).crop((left, top, left + s, top + s)), dtype=np.uint8)
    scale = 1.0  # decoded pixels per file pixel
    if s >= REDUCING_GAP * size:  # JPEG only: other formats decode at full size
        drafted = im.draft(im.mode, (math.ceil(w * REDUCING_GAP * size / s),
                                     math.ceil(h * REDUCING_GAP * size / s)))
        if drafted is not None:  # (mode, the file's extent in decoded pixels)
            scale = drafted[1][2] / w
    # the square in decoded pixels (fractional when drafted): crop the whole pixels that hold
    # it, so that the Lanczos filter stops at its edges as on the full-size path, and resample
    # exactly the square
    x0, y0, x1, y1 = left * scale, top * scale, (left + s) * scale, (top + s) * scale
    cx, cy = math.floor(x0), math.floor(y0)
    im = im.convert(mode).crop((cx, cy, min(math.ceil(x1), im.size[0]),
                                min(math.ceil(y1), im.size[1])))
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS,
                                box=(x0 - cx, y0 - cy, x1 - cx, y1 - cy),
                                reducing_gap=REDUCING_GAP), dtype=np.uint8)
