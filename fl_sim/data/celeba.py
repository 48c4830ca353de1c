"""CelebA (Liu, Luo, Wang, Tang, "Deep Learning Face Attributes in the Wild", ICCV 2015) from
its standard local layout.

``[data] name = "celeba"``, ``path`` = the directory holding ``img_align_celeba/`` (the
aligned 178x218 JPEGs, ``000001.jpg`` ...) and the three annotation files
``identity_CelebA.txt``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` (directly,
or in ``Anno/`` and ``Eval/`` as the official archive has them). Nothing is downloaded.

* **groups** = identities: group ``k`` is the ``k``-th smallest CelebA identity number among
  the images kept (both splits share one numbering), so the ``by_identity`` partitioner gives
  one person per client (user-level attacks) and ``train-identity`` trains the identity
  metric's classifier on them.
* **attributes**: all 40 binary attributes as ``ImageData.attributes`` [N, 40] (0/1), names
  in ``DataSplits.attribute_names``; ``label = "<attribute>"`` (e.g. ``"Smiling"``) makes one
  of them the class label (2 classes), which is how property inference
  (``property_inference``, "the batch contains class 1") asks about it; ``label =
  "identity"`` (default) classifies the person.
* **splits**: ``split = "standard"`` uses ``list_eval_partition.txt`` (train = 0, test = 2,
  or 1 with ``test_partition = "valid"``); its identities do not overlap, so an identity
  metric needs ``split = "random"``: all kept images split per image by ``test_fraction``.

Preprocessing as in the 64 px CelebA of the score-based / DDPM literature: the central
``center_crop`` x ``center_crop`` square (default 140), resized (Lanczos) to ``image_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from fl_sim.data import readers
from fl_sim.data.sources import _check_params, _finish, _Split, _split
from fl_sim.data.types import DataSplits
from fl_sim.errors import ConfigError, DataError
from fl_sim.registry import DATA_SOURCES

ANNOTATIONS = ("identity_CelebA.txt", "list_attr_celeba.txt", "list_eval_partition.txt")
NUM_ATTRIBUTES = 40
_PARTITIONS = {"train": 0, "valid": 1, "test": 2}


def find_annotation(root: Path, name: str) -> Path:
    """``root/name``, ``root/Anno/name`` or ``root/Eval/name``; DataError naming all three."""
    for candidate in (root / name, root / "Anno" / name, root / "Eval" / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / name}: file not found (nor in Anno/ or Eval/); CelebA needs "
                    f"img_align_celeba/ and {', '.join(ANNOTATIONS)}")


def _rows(path: Path, *, skip: int, width: int) -> list[list[str]]:
    try:
        lines = path.read_text().splitlines()[skip:]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    rows = [ln.split() for ln in lines if ln.strip()]
    for i, row in enumerate(rows):
        if len(row) != width:
            raise DataError(f"{path}: line {i + skip + 1} has {len(row)} fields; expected "
                            f"{width}")
    if not rows:
        raise DataError(f"{path}: empty (no entries)")
    return rows


def read_annotations(root: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                          tuple[str, ...]]:
    """(file names, identity [N], attributes [N, 40] 0/1, partition [N], attribute names),
    in the order of ``identity_CelebA.txt``. Raises DataError for a missing or malformed
    file, or files that list different images."""
    ident_file, attr_file, part_file = (find_annotation(root, n) for n in ANNOTATIONS)
    ident = _rows(ident_file, skip=0, width=2)
    try:
        names = tuple(attr_file.read_text().splitlines()[1].split())
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise DataError(f"{attr_file}: no attribute-name line ({exc})") from None
    if len(names) != NUM_ATTRIBUTES:
        raise DataError(f"{attr_file}: line 2 names {len(names)} attributes; expected "
                        f"{NUM_ATTRIBUTES}")
    attr = {r[0]: r[1:] for r in _rows(attr_file, skip=2, width=NUM_ATTRIBUTES + 1)}
    part = {r[0]: r[1] for r in _rows(part_file, skip=0, width=2)}
    files = [r[0] for r in ident]
    for other, table in ((attr_file, attr), (part_file, part)):
        missing = [f for f in files if f not in table]
        if missing:
            raise DataError(f"{other}: no entry for {len(missing)} image(s) of "
                            f"{ident_file.name}, e.g. {missing[0]}")
    try:
        identity = np.array([int(r[1]) for r in ident], np.int64)
        attributes = (np.array([attr[f] for f in files], np.int64) > 0).astype(np.int64)
        partition = np.array([int(part[f]) for f in files], np.int64)
    except ValueError as exc:
        raise DataError(f"{root}: non-integer annotation ({exc})") from None
    return files, identity, attributes, partition, names


def _image_dir(root: Path) -> Path:
    d = root / "img_align_celeba"
    if (d / "img_align_celeba").is_dir():  # the archive unpacked into a folder of its name
        d = d / "img_align_celeba"
    return readers.require_dir(d)


def read_faces(folder: Path, files: list[str], *, center_crop: int, image_size: int,
               channels: int) -> np.ndarray:
    """The aligned JPEGs ``files`` -> uint8 [N, S, S, C]: central crop, then Lanczos resize."""
    from PIL import Image, UnidentifiedImageError  # lazy: keeps Pillow out of this module's import

    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(files), image_size, image_size, channels), np.uint8)
    for i, name in enumerate(files):
        p = folder / name
        try:
            with Image.open(p) as im:
                w, h = im.size
                s = min(center_crop, w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.convert(mode).crop((left, top, left + s, top + s))
                im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
                out[i] = np.asarray(im, np.uint8).reshape(image_size, image_size, channels)
        except FileNotFoundError:
            raise DataError(f"{p}: file not found (listed in identity_CelebA.txt)") from None
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"{p}: unreadable image ({exc})") from None
    return out


def _most_frequent(identity: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` identities with the most images (ties: smaller CelebA number first)."""
    ids, counts = np.unique(identity, return_counts=True)
    return np.sort(ids[np.lexsort((ids, -counts))[:k]])


@DATA_SOURCES.register("celeba")
def celeba(*, path: Path, label: str = "identity", split: Literal["standard", "random"] =
           "standard", test_partition: Literal["valid", "test"] = "test",
           test_fraction: float = 0.2, seed: int = 0, image_size: int = 64,
           center_crop: int = 140, channels: int = 3, max_identities: int | None = None,
           max_train: int | None = None, max_test: int | None = None) -> DataSplits:
    """CelebA faces with identities as groups and the 40 attributes (module doc).

    ``max_identities`` keeps the images of the K identities with the most images (before
    splitting); ``max_train`` / ``max_test`` keep the first N images of each split (only those
    are decoded).

    Raises:
        ConfigError: unknown ``label`` (lists the attributes), bad sizes or caps.
        DataError: a missing or malformed annotation file or image, naming it.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test, test_fraction=test_fraction)
    if center_crop < 1:
        raise ConfigError(f"data.center_crop: must be >= 1 (got {center_crop})")
    if max_identities is not None and max_identities < 1:
        raise ConfigError(f"data.max_identities: must be >= 1 (got {max_identities})")
    root = readers.require_dir(Path(path))
    folder = _image_dir(root)
    files, identity, attributes, partition, names = read_annotations(root)
    if label != "identity" and label not in names:
        raise ConfigError(f"data.label: got {label!r}; allowed: identity, {', '.join(names)}")
    keep = np.arange(len(files))
    if max_identities is not None:
        keep = np.flatnonzero(np.isin(identity, _most_frequent(identity, max_identities)))
    dense = np.unique(identity[keep], return_inverse=True)[1].astype(np.int64)
    y = dense if label == "identity" else attributes[keep, names.index(label)]
    # x holds row numbers into ``files``: only the images that survive the caps are decoded
    data = _Split(keep.reshape(-1, 1), y, dense, attributes[keep])
    if split == "standard":
        part = partition[keep]
        train = data.take(np.flatnonzero(part == _PARTITIONS["train"]))
        test = data.take(np.flatnonzero(part == _PARTITIONS[test_partition]))
        for what, s in (("train (0)", train), (f"{test_partition} ({_PARTITIONS[test_partition]})",
                                                 test)):
            if len(s.y) == 0:
                raise DataError(f"{root}: no {what} images in list_eval_partition.txt among "
                                "the images kept; use split = \"random\"")
    else:
        train, test = _split(data, test_fraction=test_fraction, seed=seed, where=str(root))
    train, test = train.head(max_train), test.head(max_test)
    kw: dict[str, Any] = {"center_crop": center_crop, "image_size": image_size,
                          "channels": channels}
    train = _Split(read_faces(folder, [files[i] for i in train.x[:, 0]], **kw), *_meta(train))
    test = _Split(read_faces(folder, [files[i] for i in test.x[:, 0]], **kw), *_meta(test))
    num_classes = int(dense.max()) + 1 if label == "identity" else 2
    return _finish("celeba", train, test, where=str(root), image_size=None, channels=None,
                   max_train=None, max_test=None, num_classes=num_classes,
                   class_names=() if label == "identity" else (f"not {label}", label),
                   attribute_names=names)


def _meta(s: _Split) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    return s.y, s.groups, s.attributes
