"""Data sets as the papers use them (issue 24 item 3): CelebA's standard layout, CIFAR-100's
pickles, image folders resized to 64/128/256 px, and Flower's data layer (flwr-datasets) over
local parquet files.

Every stand-in is written by the test with content that encodes what the loader must keep
together (an image's colour encodes its identity / label / index), so the assertions check
that images, labels, groups, attributes and partitions stay aligned, not only that files load.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl_sim.data import load_data, partition_dataset
from fl_sim.errors import ConfigError, DataError

ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips "
         "Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin "
         "Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open "
         "Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
         "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
# 15 images: CelebA identity numbers (17 most frequent, then 2935, then 5), the partition of
# list_eval_partition.txt (9 train, 3 valid, 3 test) and one colour per identity
IDENTITY = [2935, 17, 17, 2935, 5, 17, 2935, 5, 17, 2935, 17, 5, 17, 2935, 17]
PARTITION = [0] * 9 + [1] * 3 + [2] * 3
COLOUR = {5: (200, 40, 40), 17: (40, 200, 40), 2935: (40, 40, 200)}
DENSE = {5: 0, 17: 1, 2935: 2}  # groups: k-th smallest identity number


def _attributes() -> np.ndarray:
    """Seeded +-1 attribute matrix [15, 40] as CelebA writes it."""
    return np.where(np.random.default_rng(0).random((15, 40)) < 0.5, -1, 1)


def _write_celeba(root: Path, *, official: bool = False) -> None:
    img = root / "img_align_celeba"
    img.mkdir(parents=True)
    for i, ident in enumerate(IDENTITY):
        a = np.empty((218, 178, 3), np.uint8)
        a[:] = (255, 0, 255)                     # magenta border: must be cropped away
        a[39:179, 19:159] = COLOUR[ident]         # the central 140 x 140 square
        Image.fromarray(a).save(img / f"{i + 1:06d}.jpg", quality=95)
    names = [f"{i + 1:06d}.jpg" for i in range(15)]
    anno, ev = (root / "Anno", root / "Eval") if official else (root, root)
    anno.mkdir(exist_ok=True)
    ev.mkdir(exist_ok=True)
    (anno / "identity_CelebA.txt").write_text(
        "".join(f"{n} {i}\n" for n, i in zip(names, IDENTITY, strict=True)))
    attr = _attributes()
    (anno / "list_attr_celeba.txt").write_text(
        "15\n" + " ".join(ATTRS) + "\n"
        + "".join(f"{n}  " + " ".join(f"{v:2d}" for v in row) + "\n"
                  for n, row in zip(names, attr, strict=True)))
    (ev / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, PARTITION, strict=True)))


@pytest.fixture(scope="module")
def celeba_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("celeba")
    _write_celeba(root)
    return root


def _colour_of(images: torch.Tensor) -> torch.Tensor:
    return (images.mean(dim=(2, 3)) * 255).round()


def test_celeba_standard_split_groups_images_attributes(celeba_dir: Path) -> None:
    d = load_data("celeba", path=celeba_dir, image_size=16)
    train_ids, test_ids = IDENTITY[:9], IDENTITY[12:]
    assert d.train.images.shape == (9, 3, 16, 16) and len(d.test) == 3   # partitions 0 and 2
    assert d.train.groups.tolist() == [DENSE[i] for i in train_ids]
    assert d.test.groups.tolist() == [DENSE[i] for i in test_ids]
    assert d.train.labels.tolist() == d.train.groups.tolist()           # label = identity
    # each image is its identity's colour everywhere: the border was cropped (JPEG: +-6)
    want = torch.tensor([COLOUR[i] for i in train_ids], dtype=torch.float32)
    assert (_colour_of(d.train.images) - want).abs().max() <= 6
    assert ((d.train.images * 255 - want[:, :, None, None]).abs().amax() <= 24)
    assert d.attribute_names == tuple(ATTRS)
    assert d.train.attributes.tolist() == (_attributes()[:9] > 0).astype(int).tolist()
    assert d.test.attributes.tolist() == (_attributes()[12:] > 0).astype(int).tolist()


def test_celeba_attribute_as_label_for_property_inference(celeba_dir: Path) -> None:
    d = load_data("celeba", path=celeba_dir, image_size=8, label="Smiling",
                  test_partition="valid")
    k = ATTRS.index("Smiling")
    assert d.train.labels.tolist() == (_attributes()[:9, k] > 0).astype(int).tolist()
    assert d.test.labels.tolist() == (_attributes()[9:12, k] > 0).astype(int).tolist()
    assert d.num_classes == 2 and d.class_names == ("not Smiling", "Smiling")
    assert d.test.groups.tolist() == [DENSE[i] for i in IDENTITY[9:12]]


def test_celeba_random_split_and_identity_clients(celeba_dir: Path) -> None:
    """split = "random" puts identities on both sides (what the identity metric needs);
    by_identity then gives every client exactly one person."""
    a = load_data("celeba", path=celeba_dir, image_size=8, split="random", test_fraction=0.4)
    b = load_data("celeba", path=celeba_dir, image_size=8, split="random", test_fraction=0.4)
    assert len(a.train) + len(a.test) == 15 and len(a.test) == 6
    assert torch.equal(a.train.groups, b.train.groups)                   # seeded
    assert set(a.train.groups.tolist()) == set(a.test.groups.tolist()) == {0, 1, 2}
    parts = partition_dataset(a.train, "by_identity", 3, seed=0)
    for client, idx in enumerate(parts):
        assert set(a.train.groups[idx].tolist()) == {client}
        rgb = COLOUR[sorted(COLOUR)[client]]
        assert (_colour_of(a.train.images[idx]) - torch.tensor(rgb)).abs().max() <= 6


def test_celeba_max_identities_official_layout(tmp_path: Path) -> None:
    _write_celeba(tmp_path, official=True)                               # Anno/ + Eval/
    d = load_data("celeba", path=tmp_path, image_size=8, max_identities=2, split="random")
    kept = [i for i in IDENTITY if i in (17, 2935)]                      # the two most frequent
    assert len(d.train) + len(d.test) == len(kept) == 12
    assert sorted(d.train.groups.tolist() + d.test.groups.tolist()) == sorted(
        0 if i == 17 else 1 for i in kept)


def test_celeba_errors_name_what_is_missing(tmp_path: Path, celeba_dir: Path) -> None:
    _write_celeba(tmp_path)
    (tmp_path / "list_attr_celeba.txt").unlink()
    with pytest.raises(DataError, match="list_attr_celeba.txt: file not found"):
        load_data("celeba", path=tmp_path)
    with pytest.raises(ConfigError, match="allowed: identity, 5_o_Clock_Shadow.*Smiling"):
        load_data("celeba", path=celeba_dir, label="smile")
    (tmp_path / "img_align_celeba" / "000003.jpg").unlink()
    (tmp_path / "list_attr_celeba.txt").write_text((celeba_dir / "list_attr_celeba.txt")
                                                   .read_text())
    with pytest.raises(DataError, match="000003.jpg: file not found"):
        load_data("celeba", path=tmp_path, image_size=8)


# -- CIFAR-100 -------------------------------------------------------------------------------
def _cifar100_pickle(path: Path, n: int, offset: int) -> None:
    data = np.zeros((n, 3, 32, 32), np.uint8)
    for i in range(n):
        data[i, 0] = offset + i                  # red = index: alignment check
        data[i, 1, 5, 7] = 250                   # one green pixel at row 5, column 7
    batch = {b"data": data.reshape(n, 3072), b"fine_labels": [(7 * (offset + i)) % 100
                                                               for i in range(n)],
             b"coarse_labels": [(offset + i) % 20 for i in range(n)], b"batch_label": b"x"}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar100_fine_coarse_labels_names_layout(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _cifar100_pickle(root / "train", 6, 0)
    _cifar100_pickle(root / "test", 4, 100)
    (root / "meta").write_bytes(pickle.dumps(
        {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, protocol=2))
    fine = load_data("cifar100", path=tmp_path)
    assert fine.train.images.shape == (6, 3, 32, 32) and fine.num_classes == 100
    assert (fine.train.images[:, 0, 0, 0] * 255).round().tolist() == list(range(6))
    assert fine.train.images[2, 1, 5, 7] > 0.9 and fine.train.images[2, 1, 7, 5] == 0  # HWC
    assert fine.train.labels.tolist() == [0, 7, 14, 21, 28, 35]
    assert fine.test.labels.tolist() == [0, 7, 14, 21]  # 700, 707, ... mod 100
    assert fine.class_names[7] == "fine7" and fine.mean == (0.5071, 0.4865, 0.4409)
    coarse = load_data("cifar100", path=root, label="coarse")
    assert coarse.num_classes == 20 and coarse.test.labels.tolist() == [0, 1, 2, 3]
    assert coarse.class_names[3] == "coarse3"
    (root / "meta").unlink()
    with pytest.raises(DataError, match="meta: file not found"):
        load_data("cifar100", path=tmp_path)


# -- image folder at paper sizes ---------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 128, 256])
def test_image_folder_resized_to_paper_sizes(tmp_path: Path, size: int) -> None:
    colours = {"cat": (250, 10, 10), "dog": (10, 250, 10), "eel": (10, 10, 250)}
    shapes = [(300, 200), (90, 120), (256, 256)]
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for j, (w, h) in enumerate(shapes):
            Image.new("RGB", (w, h), rgb).save(tmp_path / name / f"{j}.png")
    d = load_data("image_folder", path=tmp_path, image_size=size, test_fraction=1 / 3)
    assert d.train.images.shape == (6, 3, size, size) and len(d.test) == 3
    for split in (d.train, d.test):
        want = torch.tensor([list(colours.values())[k] for k in split.labels.tolist()])
        assert (_colour_of(split.images) - want).abs().max() <= 1       # labels = sorted dirs


# -- Flower's data layer over local parquet -------------------------------------------------
pytest.importorskip("flwr_datasets")


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import datasets

    root = tmp_path_factory.mktemp("parquet")
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64"),
                               "writer": datasets.Value("string")})

    def write(n: int, name: str, offset: int) -> str:
        imgs = [Image.fromarray(np.full((8, 8, 3), 4 * (offset + i), np.uint8))
                for i in range(n)]          # pixel value = 4 x row: alignment check
        cols = {"img": imgs, "label": [(offset + i) % 3 for i in range(n)],
                "writer": [f"w{(offset + i) % 4}" for i in range(n)]}
        path = root / f"{name}.parquet"
        datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(path))
        return str(path)

    return {"train": write(30, "train", 0), "test": write(6, "test", 30)}


def _rows(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0] * 255 / 4).round().long().tolist()


def test_flwr_datasets_source_keeps_rows_aligned(parquet_files: dict[str, str],
                                                 tmp_path: Path) -> None:
    d = load_data("flwr_datasets", data_files=parquet_files, cache_dir=tmp_path,
                  group_column="writer")
    assert d.train.images.shape == (30, 3, 8, 8) and len(d.test) == 6
    from flwr_datasets import FederatedDataset

    rows = _rows(d.train.images)
    assert sorted(rows) == list(range(30)) and rows != list(range(30))  # FederatedDataset shuffles
    users = FederatedDataset(dataset="parquet", data_files=parquet_files, partitioners={"train": 2},
                             cache_dir=str(tmp_path)).load_split("train")
    assert rows == [int(np.asarray(im)[0, 0, 0]) // 4 for im in users["img"]]  # the user's order
    assert d.train.labels.tolist() == [r % 3 for r in rows]
    assert d.train.groups.tolist() == [r % 4 for r in rows]             # "w0".."w3" -> 0..3
    assert sorted(_rows(d.test.images)) == list(range(30, 36))
    with pytest.raises(DataError, match="nope.parquet: file not found"):
        load_data("flwr_datasets", data_files={"train": str(tmp_path / "nope.parquet")})
    with pytest.raises(ConfigError, match="only local builders"):
        load_data("flwr_datasets", dataset="cifar10", data_files=parquet_files)


def test_flwr_partitioners_match_flower(parquet_files: dict[str, str], tmp_path: Path) -> None:
    """fl-sim's 'flwr_datasets' partitioner gives the partitions Flower's own class gives on the
    same labels and seed: same label counts per client, disjoint, covering everything."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    d = load_data("flwr_datasets", data_files=parquet_files, cache_dir=tmp_path)
    opts = {"partition_by": "label", "alpha": 0.5, "min_partition_size": 2, "seed": 7}
    parts = partition_dataset(d.train, "flwr_datasets", 4, seed=0,
                              partitioner="DirichletPartitioner", options=opts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    ref = DirichletPartitioner(num_partitions=4, **opts)
    ref.dataset = datasets.Dataset.from_dict({"label": d.train.labels.tolist()})
    for i, idx in enumerate(parts):
        assert sorted(d.train.labels[idx].tolist()) == sorted(ref.load_partition(i)["label"])
    by_writer = partition_dataset(d.train, "flwr_datasets", 4, seed=0,
                                  partitioner="NaturalIdPartitioner",
                                  options={"partition_by": "group"}, groups=np.array(
                                      [r % 4 for r in _rows(d.train.images)]))
    assert sorted(len(set((_rows(d.train.images[p])[j] % 4) for j in range(len(p))))
                  for p in by_writer) == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="known: .*IidPartitioner"):
        partition_dataset(d.train, "flwr_datasets", 2, seed=0, partitioner="Nope")


def test_from_federated_dataset_is_the_users_setup(parquet_files: dict[str, str],
                                                   tmp_path: Path) -> None:
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    from fl_sim.data.flower_datasets import from_federated_dataset

    def users_fds() -> FederatedDataset:
        return FederatedDataset(dataset="parquet", data_files=parquet_files,
                                partitioners={"train": IidPartitioner(num_partitions=3)},
                                cache_dir=str(tmp_path))

    splits, parts = from_federated_dataset(users_fds())
    theirs = users_fds()
    for i, idx in enumerate(parts):
        mine = _rows(splits.train.images[idx])
        flower = [int(np.asarray(im)[0, 0, 0]) // 4 for im in theirs.load_partition(i)["img"]]
        assert sorted(mine) == sorted(flower) and len(mine) == 10


# -- 10,000 clients (issue 24 item 7) ---------------------------------------------------------
def test_by_identity_at_10000_clients_is_the_round_robin_rule() -> None:
    """The sort-based by_identity (one scan per client took 21 s at 10,000 clients) still
    deals identities round-robin: client c holds exactly identities c, c + n, c + 2n, ...
    (checked against that rule literally on a seeded draw), and at 10,000 clients it is a
    disjoint cover."""
    from fl_sim.registry import PARTITIONERS

    fn = PARTITIONERS.get("by_identity")
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 2_000) * 3 + 5                 # sparse, unsorted ids
    parts = fn(np.zeros(2_000, np.int64), 7, rng=rng, groups=groups)
    unique = np.unique(groups)
    for c, idx in enumerate(parts):
        assert np.array_equal(idx, np.flatnonzero(np.isin(groups, unique[c::7])))
    big = rng.integers(0, 12_000, 60_000)
    parts = fn(np.zeros(60_000, np.int64), 10_000, rng=rng, groups=big)
    assert len(parts) == 10_000 and min(len(p) for p in parts) >= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(60_000))


def test_synthetic_source_has_enough_images_for_10000_clients() -> None:
    d = load_data("synthetic", num_train=20_000, num_test=100, image_size=8)
    assert d.train.images.shape == (20_000, 1, 8, 8)
    assert np.bincount(d.train.labels.numpy()).tolist() == [2_000] * 10   # balanced
    again = load_data("synthetic", num_train=20_000, num_test=100, image_size=8)
    assert torch.equal(d.train.images, again.train.images)               # seeded
    # learnable: nearest class mean classifies the test images (measured 100/100 at seed 0;
    # the bound 0.9 leaves room for a changed noise draw, a broken label alignment gives ~0.1)
    means = torch.stack([d.train.images[d.train.labels == k].mean(0) for k in range(10)])
    dist = ((d.test.images[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == d.test.labels).float().mean() >= 0.9
    parts = partition_dataset(d.train, "iid", 10_000, seed=0)
    assert len(parts) == 10_000 and {len(p) for p in parts} == {2}
