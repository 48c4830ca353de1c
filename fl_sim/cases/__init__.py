"""Attack cases as small recorded run directories, written without Ray; every case a test or
benchmark attacks is read back through :class:`~fl_sim.run_dir.Run` and its views.

* :mod:`fl_sim.cases.federation` — :func:`build_case`: a small federation (per-client data,
  FedSGD/FedAvg rounds) recorded by the taps' store writers; the peer cases read it through
  the peer view;
* :mod:`fl_sim.cases.server` — :func:`server_record`: one given server-side update (with its
  global, training parameters and ground truth) recorded as the server tap does and read back
  through ``Run.view("server", grant=...)`` with exactly the declared grant;
* :mod:`fl_sim.cases.records` — the reference updates (FedSGD gradient, FedAvg delta, for
  classifiers and for the DDPM loss) built on it;
* :mod:`fl_sim.cases.data` — the reference images (vendored CIFAR-10 slice by path, digits),
  specs and tasks, and the digits prior.

Importing this package does not import flwr or ray.
"""

from fl_sim.cases.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGE_SIZE,
    NUM_TRAIN_TIMESTEPS,
    REFERENCE_MODELS,
    cifar_distinct,
    cifar_images,
    cifar_labels,
    cifar_train_images,
    diffusion_spec,
    digits_victims,
    global_task,
    make_spec,
    make_task,
    torch_threads,
    train_digits_prior,
)
from fl_sim.cases.federation import (
    DIGITS,
    DIGITS_PRIOR_CONFIG,
    FINAL_MODEL,
    METRICS_FILE,
    RUN_FILE,
    SPEC_FILE,
    CaseClient,
    build_case,
    digits_peer_case,
    digits_spec,
    digits_splits,
    others_truth,
)
from fl_sim.cases.records import (
    diffusion_delta_record,
    diffusion_record,
    draw_aux,
    fedavg_delta_record,
    make_record,
    with_update,
)
from fl_sim.cases.server import (
    check_declared,
    read_server_record,
    rerecord,
    server_record,
    write_server_case,
)

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "DIGITS", "DIGITS_PRIOR_CONFIG", "FINAL_MODEL", "IMAGE_SIZE",
    "METRICS_FILE", "NUM_TRAIN_TIMESTEPS", "REFERENCE_MODELS", "RUN_FILE", "SPEC_FILE",
    "CaseClient", "build_case", "check_declared", "cifar_distinct", "cifar_images",
    "cifar_labels", "cifar_train_images", "diffusion_delta_record", "diffusion_record",
    "diffusion_spec", "digits_peer_case", "digits_spec", "digits_splits", "digits_victims",
    "draw_aux", "fedavg_delta_record", "global_task", "make_record", "make_spec", "make_task",
    "others_truth", "read_server_record", "server_record", "torch_threads",
    "train_digits_prior", "write_server_case", "rerecord", "with_update",
]
