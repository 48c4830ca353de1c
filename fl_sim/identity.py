"""Face-identity metric: a small identity classifier and per-user identity scores.

User-level attacks (``user_level_diffusion``) recover ONE representative image of a person,
not the private batch, so PSNR/SSIM against the batch say little. This module scores a
reconstruction by WHO it shows, with a small CNN trained on HELD-OUT images of every user
(images no client trains on; e.g. the ``test`` split of an ``npz`` source with groups):

- ``identity_top1``: the identity whose gallery images the reconstruction's embedding is most
  similar to on average (cosine; nearest class mean in the classifier's embedding space);
  ``identity_top1_head``: the classifier head's argmax of the mean logits;
- ``identity_correct``: 1.0 when ``identity_top1`` is the attacked user's identity, else 0.0;
  ``identity_rank``: the rank of the true identity in that ordering (1 = top);
- ``sim_own`` / ``sim_others``: mean cosine similarity of the reconstruction's penultimate
  embedding to the embeddings of the attacked user's held-out ("gallery") images / to those
  of every other user's.

The saved model directory holds ``identity.safetensors`` (state dict + gallery embeddings
and their identities; safetensors only, never a pickle) and ``identity.json`` (shape,
classes, training config, held-out accuracy). Nothing is downloaded; no flwr/ray import.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fl_sim.config import DataConfig, validate_section
from fl_sim.data import load_data
from fl_sim.errors import ConfigError, DataError, MissingResourceError
from fl_sim.output_dirs import check_output_dir
from fl_sim.strict import StrictNumbers

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "identity.safetensors"
#: formats that load through pickle: refused, never opened (see :func:`load_identity`)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
META_FILE = "identity.json"
EMBED_DIM = 64

__all__ = ["IdentityModel", "IdentityNet", "identity_scores", "load_identity",
           "score_identity", "train_identity", "train_identity_from_config"]


class IdentityNet(nn.Module):
    """Three conv blocks -> global average pool -> 64-d embedding -> ``num_classes`` logits.

    Input ``[B, C, H, W]`` in [0, 1]; each image is standardised (zero mean, unit std) first,
    so global brightness does not decide the identity. ``embed(x) -> [B, 64]``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        chans = (in_channels, 32, 64, 128)
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embedding = nn.Linear(chans[-1], EMBED_DIM)
        self.head = nn.Linear(EMBED_DIM, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        x = (x - flat.mean(1).view(-1, 1, 1, 1)) / flat.std(1).clamp_min(1e-3).view(-1, 1, 1, 1)
        return F.relu(self.embedding(self.features(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


@dataclass(frozen=True)
class IdentityModel:
    """A loaded identity classifier (eval mode) with its gallery: ``gallery [G, 64]`` embeddings
    of the held-out images and their identities ``gallery_ids [G]``."""

    net: IdentityNet
    gallery: Tensor
    gallery_ids: Tensor
    image_size: int
    in_channels: int
    metadata: dict[str, Any]


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def train_identity(images: Tensor, identities: Tensor, out: str | Path, *, epochs: int = 60,
                   lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Train :class:`IdentityNet` on ``images [N, C, H, W]`` in [0, 1] with ``identities [N]``
    (int64) and save it to the directory ``out``; returns ``out``.

    Adam, cross-entropy, random horizontal flips and +-1 pixel shifts, seeded (one generator).
    The training images themselves become the gallery for ``sim_own`` / ``sim_others``.
    Raises :class:`~fl_sim.errors.DataError` for mismatched shapes or fewer than 2 identities.
    """
    if images.dim() != 4 or identities.shape != (images.shape[0],):
        raise DataError(f"identity training: images {tuple(images.shape)} and identities "
                        f"{tuple(identities.shape)} do not pair up ([N, C, H, W] and [N])")
    ids = identities.to(torch.int64)
    num_classes = int(ids.max()) + 1
    if len(torch.unique(ids)) < 2:
        raise DataError("identity training: need images of at least 2 identities")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = IdentityNet(images.shape[1], num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    n = images.shape[0]
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            x = images[idx]
            if torch.rand((), generator=gen) < 0.5:
                x = x.flip(-1)
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            loss = F.cross_entropy(net(x), ids[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        gallery = net.embed(images)
        train_acc = float((net(images).argmax(1) == ids).float().mean())
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
    save_file({**tensors, "gallery": gallery.contiguous(), "gallery_ids": ids.contiguous()},
              str(root / WEIGHTS_FILE))
    meta = {"format": "fl-sim-identity", "in_channels": int(images.shape[1]),
            "image_size": int(images.shape[-1]), "num_classes": num_classes,
            "num_images": n, "epochs": epochs, "lr": lr, "batch_size": batch_size,
            "seed": seed, "train_accuracy": train_acc, **dict(metadata or {})}
    (root / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info("identity classifier: %d images, %d identities, train accuracy %.3f -> %s",
                n, num_classes, train_acc, root)
    return root


def load_identity(path: str | Path) -> IdentityModel:
    """The identity model saved at ``path`` by :func:`train_identity`.

    Only ``identity.safetensors`` is read: a directory holding a pickled checkpoint
    (``identity.pt`` & co.) instead is refused without opening it, since unpickling runs
    code. Raises :class:`~fl_sim.errors.MissingResourceError` (no such directory) or
    :class:`~fl_sim.errors.DataError` (not an identity model, or a pickle), one line each.
    """

    root = Path(path)
    if not root.exists():
        raise MissingResourceError(f"identity model {root}: no such directory (train one with "
                                   "`fl-sim train-identity`)")
    if not (root / WEIGHTS_FILE).is_file() and root.is_dir():
        pickled = sorted(f.name for f in root.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise DataError(f"identity model {root}: refusing {pickled[0]} (a pickle, which "
                            f"would run code when loaded); only {WEIGHTS_FILE} is read -- "
                            "convert it with safetensors.torch.save_file or retrain with "
                            "`fl-sim train-identity`")
    try:
        meta = json.loads((root / META_FILE).read_text())
        blob = load_file(str(root / WEIGHTS_FILE), device="cpu")
        net = IdentityNet(int(meta["in_channels"]), int(meta["num_classes"]))
        net.load_state_dict({k[4:]: v for k, v in blob.items() if k.startswith("net.")})
        gallery, gallery_ids = blob["gallery"], blob["gallery_ids"]
    except Exception as exc:  # noqa: BLE001 -- json/safetensors/torch raise many types
        raise DataError(f"identity model {root}: not a valid fl-sim identity model "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    return IdentityModel(net=net.eval(), gallery=gallery, gallery_ids=gallery_ids,
                         image_size=int(meta["image_size"]),
                         in_channels=int(meta["in_channels"]), metadata=meta)


@torch.no_grad()
def identity_scores(model: IdentityModel, recon: Tensor, identity: int) -> dict[str, float]:
    """Identity scores of reconstruction(s) ``recon [R, C, H, W]`` in [0, 1] of the user
    ``identity``: ``identity_top1``, ``identity_correct``, ``sim_own``, ``sim_others`` (see
    the module doc; similarities averaged over the R images and the gallery images).

    Images of another size are resized (bilinear, antialiased) to the model's. Raises
    :class:`~fl_sim.errors.ConfigError` for a channel mismatch or an identity the model
    has no gallery images of.
    """
    if recon.dim() == 3:
        recon = recon.unsqueeze(0)
    if recon.shape[1] != model.in_channels:
        raise ConfigError(f"identity model takes {model.in_channels}-channel images; the "
                          f"reconstruction has {recon.shape[1]}")
    own = model.gallery_ids == int(identity)
    if not bool(own.any()) or bool(own.all()):
        raise ConfigError(f"identity {identity}: the identity model's gallery has no images "
                          "of it (or only of it)")
    x = _resize(recon.detach().float().cpu(), model.image_size)
    emb = F.normalize(model.net.embed(x), dim=1)
    gal = F.normalize(model.gallery, dim=1)
    sims = emb @ gal.T  # [R, G]
    classes = torch.unique(model.gallery_ids)
    per_id = torch.stack([sims[:, model.gallery_ids == c].mean() for c in classes])  # [I]
    top1 = int(classes[per_id.argmax()])
    head = int(model.net.head(model.net.embed(x)).mean(0).argmax())
    rank = 1 + int((per_id > per_id[classes == int(identity)][0]).sum())
    return {"identity_top1": float(top1), "identity_true": float(identity),
            "identity_correct": float(top1 == int(identity)), "identity_rank": float(rank),
            "identity_top1_head": float(head),
            "sim_own": float(sims[:, own].mean()), "sim_others": float(sims[:, ~own].mean())}


def train_identity_from_config(cfg: Mapping[str, Any], out: str | Path) -> Path:
    """``fl-sim train-identity``: ``cfg`` has ``[data]`` (a data source, as in a run config)
    and optional ``[identity]`` (``split`` "test" (default: the held-out split) or "train",
    ``epochs``, ``lr``, ``batch_size``, ``seed``). Identities are the source's groups when it
    has them, else its labels. Raises :class:`~fl_sim.errors.ConfigError` for unknown keys."""

    unknown = sorted(set(cfg) - {"data", "identity"})
    if unknown:
        raise ConfigError(f"train-identity: unknown keys {unknown}; allowed: [data], "
                          "[identity] split/epochs/lr/batch_size/seed")
    data = validate_section(DataConfig, cfg.get("data", {}), "data")
    opts = validate_section(IdentityOptions, cfg.get("identity", {}), "identity").model_dump()
    split = opts.pop("split")
    check_output_dir(Path(out), what="identity model", markers=(META_FILE, WEIGHTS_FILE))
    splits = load_data(data.name, **data.params)
    part = splits.test if split == "test" else splits.train
    ids = part.groups if part.groups is not None else part.labels
    return train_identity(torch.as_tensor(part.images).float(), torch.as_tensor(ids).long(), out,
                          metadata={"data": data.model_dump(), "split": split}, **opts)


class IdentityOptions(StrictNumbers):
    """``[identity]`` of a ``train-identity`` config (unknown keys, zero epochs, non-finite
    or non-positive rates refused)."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    split: Literal["train", "test"] = "test"
    epochs: int = pydantic.Field(60, ge=1)
    lr: float = pydantic.Field(3e-3, gt=0)
    batch_size: int = pydantic.Field(32, ge=1)
    seed: int = pydantic.Field(0, ge=0)


@functools.lru_cache(maxsize=4)
def _cached(path: str) -> IdentityModel:
    return load_identity(path)


def score_identity(path: str | Path, recon: Tensor, truth_labels: Tensor) -> dict[str, float]:
    """The runner's hook: :func:`identity_scores` of ``recon`` against the ONE identity of the
    truth's labels (``by_identity``: label = person); ``{}`` when the truth holds several
    identities (not a user-level batch) or no labels. Raises as :func:`load_identity`."""
    ids = torch.unique(truth_labels.flatten()) if truth_labels.numel() else truth_labels
    if ids.numel() != 1 or not recon.numel():
        return {}
    return identity_scores(_cached(str(path)), recon, int(ids[0]))
