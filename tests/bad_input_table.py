"""The table of bad inputs of ``tests/unit/test_bad_inputs.py``: each case builds the argv of
one ``fl-sim`` command (config values, data files, run directories, attack entries) and names
the text its one-line error must contain. Split from the test module (which runs the table
and checks what the refusals leave behind) to keep both readable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from bad_files import (
    bad_idx,
    config_only_pretrained,
    corrupt_png,
    corrupt_stream,
    grid,
    huge_header,
    huge_label,
    malformed_header,
    nan_images,
    negative_label,
    object_array,
    pickled_identity,
    pickled_pretrained,
    prior_with_state,
    truncated_zip,
    wrong_keys,
)

from fl_sim import config
from fl_sim.records import ModelSpec, TruthStep
from fl_sim.stores import ObservationStore, PeerStore, TruthStore

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.toml")
DIFFUSION = str(ROOT / "configs" / "diffusion_digits.toml")
PRIOR = str(ROOT / "configs" / "prior_digits.toml")
SPEC = ModelSpec(model="mlp", model_params={"hidden": (4,)}, task="classifier",
                 task_params={}, in_channels=1, num_classes=3, image_size=2, mean=(0.5,),
                 std=(0.5,))


# -- a recorded run, written by hand (no Ray) -------------------------------------------------
def make_run(tmp: Path, *, peers: tuple[int, ...] = (0,), nan_update: bool = False,
             nan_own: bool = False) -> Path:
    """Round 1 of a 3-client, 2-round FedAvg run as the stores record it."""
    run = tmp / "run"
    cfg = config.load(DEFAULT, ["federation.num_rounds=2", "attacks=[]",
                                f"federation.peer_clients={list(peers)}",
                                'strategy={name="fedavg"}'])
    config.save_resolved(cfg, run)
    (run / "spec.json").write_text(json.dumps(SPEC.to_json()))
    (run / "run.json").write_text(json.dumps({"run_id": "run", "status": "complete"}))
    obs, truth = ObservationStore(run), TruthStore(run)
    g = {"w": torch.zeros(3, 4)}
    obs.write_global(1, g)
    meta = {"update_kind": "delta", "num_examples": 2, "local_steps": 1, "lr": 0.1,
            "batch_size": 2, "defenses": []}
    for c in range(3):
        w = torch.full((3, 4), float(c + 1))
        if nan_update and c == 1:
            w[0, 0] = float("nan")
        obs.write_update("server_in", 1, c, {"w": w}, meta)
        truth.write(1, c, [TruthStep(0, torch.rand(2, 1, 2, 2), torch.tensor([c, 2]),
                                     torch.tensor([2 * c, 2 * c + 1]))])
    for p in peers:
        own = torch.full((3, 4), float(p + 1))
        if nan_own:
            own[1, 1] = float("inf")
        store = PeerStore(run, p)
        store.write_global(1, g, {})
        store.write_update(1, {"w": own}, meta)
        store.write_global(2, {"w": torch.full((3, 4), 2.0)}, {
            "aggregated_round": 1, "aggregated_num_examples": 6, "aggregated_num_clients": 3})
    return run


def corrupt_update(tmp: Path) -> Path:
    run = make_run(tmp)
    (run / "observations" / "server_in" / "r0001" / "c0001.safetensors").write_bytes(b"\0" * 64)
    return run


def resume_state(tmp: Path, state: str) -> Path:
    run = make_run(tmp)
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.json").write_text(state)
    return run


# -- the table ---------------------------------------------------------------------------------
Case = Callable[[Path], list[str]]


#: The federation the table's messages assume, whatever configs/default.toml says today.
BASE = ("federation.num_clients=3", "federation.num_rounds=5", "federation.peer_clients=[0]")


def run_with(*sets: str) -> Case:
    return lambda tmp: ["run", DEFAULT, *(a for s in (*BASE, *sets) for a in ("--set", s))]


def run_data(name: str, make: Callable[[Path], Path], *extra: str) -> Case:
    def case(tmp: Path) -> list[str]:
        return run_with(f'data={{name="{name}", path="{make(tmp)}"}}', *extra)(tmp)
    return case


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def prior_to(out: Callable[[Path], Path], *sets: str) -> Case:
    """``fl-sim train-prior configs/prior_digits.toml --out OUT --set ...``."""
    return lambda tmp: ["train-prior", PRIOR, "--out", str(out(tmp)), "--no-progress",
                        *_sets(*sets)]


def prior_with(*sets: str) -> Case:
    return prior_to(lambda t: t / "prior", *sets)


def prior_state(state: str) -> Case:
    return prior_to(lambda t: prior_with_state(t, Path(PRIOR), state))


#: a train-identity config on the bundled digits (its labels are the identities)
IDENTITY_DATA = '[data]\nname = "digits"\nimage_size = 8\n'


def identity(text: str, out: Callable[[Path], Path] = lambda t: t / "idm") -> Case:
    return lambda tmp: ["train-identity", str(_write(tmp, "id.toml", text)), "--out",
                        str(out(tmp))]


def bench(out: Callable[[Path], Path] | None = None, **grid_text: str) -> Case:
    """``fl-sim bench GRID`` over configs/default.toml; no ``--out``: the default
    bench/<name> under the working directory."""
    def case(tmp: Path) -> list[str]:
        argv = ["bench", str(grid(tmp, Path(DEFAULT), **grid_text)), "--no-progress"]
        return argv + (["--out", str(out(tmp))] if out is not None else [])
    return case


def diffusion_with(*sets: str) -> Case:
    return lambda tmp: ["run", DIFFUSION, *_sets("federation.num_rounds=1", *sets)]


def attack_on(make: Callable[[Path], Path], *args: str) -> Case:
    return lambda tmp: ["attack", str(make(tmp)), *args]


def _write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _write_bytes(tmp: Path, name: str, raw: bytes) -> Path:
    p = tmp / name
    p.write_bytes(raw)
    return p


def _run_file(name: str, text: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        run = make_run(tmp)
        (run / name).write_text(text)
        return run
    return make


CASES: dict[str, tuple[Case, str]] = {
    # config: non-finite numbers anywhere (sections and plug-in parameters)
    "lr inf": (run_with("federation.lr=inf"), "federation.lr: Input should be a finite"),
    "lr nan": (run_with("federation.lr=nan"), "federation.lr: Input should be a finite"),
    "lr -inf": (run_with("federation.lr=-inf"), "finite number"),
    "fraction nan": (run_with("federation.fraction_train=nan"), "fraction_train"),
    "num_cpus inf": (run_with("federation.client_resources.num_cpus=inf"), "num_cpus"),
    "server_lr inf": (run_with("strategy.server_lr=inf"), "strategy.server_lr: Input should"),
    "test_fraction nan": (run_with("data.test_fraction=nan"), "data.test_fraction"),
    "attack tv nan": (run_with("attacks.1.tv_weight=nan"), "attacks[1].tv_weight"),
    # config: booleans where numbers are expected
    "num_clients true": (run_with("federation.num_clients=true"),
                         "federation.num_clients: a boolean where a number is expected"),
    "num_rounds false": (run_with("federation.num_rounds=false"), "federation.num_rounds"),
    "batch_size true": (run_with("federation.batch_size=true"), "federation.batch_size"),
    "lr true": (run_with("federation.lr=true"), "federation.lr: a boolean"),
    "seed true": (run_with("run.seed=true"), "run.seed"),
    "peer_clients [true]": (run_with("federation.peer_clients=[true]"), "peer_clients"),
    "attack iterations true": (run_with("attacks.1.max_iterations=true"),
                               "attacks[1].max_iterations: a boolean"),
    "num_clients string": (run_with('federation.num_clients="many"'), "num_clients"),
    "unknown key": (run_with("federation.bogus=1"), "federation.bogus: unknown key"),
    "json config with NaN": (lambda t: ["run", str(_write(t, "c.json",
                                                          '{"federation": {"lr": NaN}}'))],
                             "federation.lr: Input should be a finite number"),
    "config not UTF-8": (lambda t: ["run", str(_write_bytes(t, "c.toml", b"\xff\xfe[run]"))],
                         "unreadable config file"),
    "image_size 100000": (run_with("data.image_size=100000"), "GiB as float32"),
    "convnet on 4 px images": (run_with('model={name="convnet"}', "data.image_size=4"),
                               "model (convnet): image_size 4 is too small"),
    # config: clients that would receive no data (found by loading + partitioning the data)
    "max_train 5, 8 clients": (run_with("data.max_train=5", "federation.num_clients=8",
                                        "federation.peer_clients=[]", "attacks=[]"),
                               "clients [5, 6, 7] received no samples"),
    "dirichlet starves clients": (run_with("data.max_train=12", "federation.num_clients=12",
                                           'partition={name="dirichlet", alpha=0.01}',
                                           "attacks=[]"), "fewer than min_size=1 samples"),
    # config: attack entries that cannot run
    "attack client 99": (run_with("attacks.0.client=99"), "client 99 outside 0..2"),
    "attack client -1": (run_with("attacks.0.client=-1"), "client -1 outside 0..2"),
    "peer attack, no peers": (run_with("federation.peer_clients=[]"),
                              "peer attack needs federation.peer_clients"),
    "peer attack on non-peer": (run_with("attacks.2.client=2"), "client 2 is not a peer"),
    "attack round 9": (run_with("attacks.0.rounds=[9]"), "rounds [9] do not exist"),
    "attack round 0": (run_with("attacks.0.rounds=[0]"), "rounds [0] do not exist"),
    "attack rounds []": (run_with("attacks.0.rounds=[]"), "schedules nothing"),
    "peer attack, 1 client": (run_with("federation.num_clients=1",
                                       'attacks=[{name="noop", view="peer"}]'),
                              "at least 2 clients"),
    "attack client not sampled": (run_with("federation.num_clients=6",
                                           "federation.fraction_train=0.5",
                                           'attacks=[{name="noop", client=0}]'),
                                  "client 0 is not sampled in round 1"),
    "peer not sampled": (run_with("federation.num_clients=6", "federation.fraction_train=0.5",
                                  'attacks=[{name="noop", view="peer", client=0}]'),
                         "client 0 is not sampled in rounds 1 and 2 with another client"),
    "attack without taps": (run_with("federation.taps=false"), "records nothing to attack"),
    "attack without truth": (run_with("federation.record_truth=false"),
                             "nothing to score the attack against"),
    # data files
    "npz corrupt stream": (run_data("npz", corrupt_stream), "not a valid .npz file"),
    "npz malformed header": (run_data("npz", malformed_header), "unreadable .npy header"),
    "npz header claims 6 TB": (run_data("npz", huge_header),
                               "header says shape (100000000000, 8, 8)"),
    "npz label 1e9": (run_data("npz", huge_label), "label 1000000000 would mean"),
    "npz negative label": (run_data("npz", negative_label), "negative label -1"),
    "npz NaN images": (run_data("npz", nan_images), "NaN or infinite"),
    "npz truncated": (run_data("npz", truncated_zip), "not a zip archive"),
    "npz wrong keys": (run_data("npz", wrong_keys), "wrong keys"),
    "npz object array": (run_data("npz", object_array), "pickle"),
    "npz missing": (run_data("npz", lambda t: t / "nope.npz"), "file not found"),
    "image_folder corrupt png": (run_data("image_folder", corrupt_png), "unreadable image"),
    "mnist idx size": (run_data("mnist", bad_idx), "header says"),
    # run directories
    "--run-dir is a file": (lambda t: ["run", DEFAULT, "--run-dir",
                                       str(_write(t, "f", "x"))], "is a file"),
    "--run-dir under a file": (lambda t: ["run", DEFAULT, "--run-dir",
                                          str(_write(t, "f", "x") / "sub")], "is a file"),
    "--run-dir holds a run": (lambda t: ["run", DEFAULT, "--run-dir", str(make_run(t))],
                              "already holds a run"),
    "output_dir is a file": (lambda t: run_with(f'run.output_dir="{_write(t, "o", "x")}"')(t),
                             "is a file"),
    "--resume missing": (lambda t: ["run", "--resume", str(t / "nope")], "nope"),
    "--resume corrupt checkpoint": (lambda t: ["run", "--resume",
                                               str(resume_state(t, "{not json"))],
                                    "checkpoint"),
    "--resume checkpoint names missing file": (
        lambda t: ["run", "--resume", str(resume_state(t, json.dumps(
            {"round": 1, "global": "r0001.global.safetensors",
             "strategy": "r0001.strategy.safetensors", "extra": {}})))],
        "missing file"),
    "--resume checkpoint escapes": (
        lambda t: ["run", "--resume", str(resume_state(t, json.dumps(
            {"round": 1, "global": "../config.json", "strategy": "x", "extra": {}})))],
        "refusing"),
    "report missing dir": (lambda t: ["report", str(t / "nope")], "no such run directory"),
    "report non-run dir": (lambda t: ["report", str(t)], "not a run directory"),
    "report on a file": (lambda t: ["report", str(_write(t, "f", "x"))], "not a directory"),
    "report corrupt config.json": (lambda t: ["report", str(_run_file("config.json", "{")(t))],
                                   "config.json: corrupt"),
    "attack corrupt run.json": (attack_on(_run_file("run.json", "[1"), "--attack", "noop"),
                                "run.json: corrupt"),
    "attack corrupt spec.json": (attack_on(_run_file("spec.json", '{"model": 1}'), "--attack",
                                           "noop"), "spec.json: corrupt"),
    "attack invalid config.json": (attack_on(_run_file("config.json", '{"run": {"seed": -1}}'),
                                             "--attack", "noop"), "run.seed"),
    # attack entries on a recorded run
    "replay client 99": (attack_on(make_run, "--attack", "noop", "--client", "99"),
                         "client 99 outside 0..2"),
    "replay client -1": (attack_on(make_run, "--attack", "noop", "--client", "-1"),
                         "client -1 outside"),
    "replay round 9": (attack_on(make_run, "--attack", "noop", "--round", "9"),
                       "rounds [9] do not exist"),
    "replay peer, no peers": (attack_on(lambda t: make_run(t, peers=()), "--attack", "noop",
                                        "--view", "peer"), "no peer views"),
    "replay peer on non-peer": (attack_on(make_run, "--attack", "noop", "--view", "peer",
                                          "--client", "1"), "client 1 is not a peer"),
    "replay unknown attack": (attack_on(make_run, "--attack", "nope"), "unknown attack"),
    "replay bad param": (attack_on(make_run, "--attack", "dlg", "--set",
                                   "max_iterations=true"), "max_iterations: a boolean"),
    "replay lr nan": (attack_on(make_run, "--attack", "inverting_gradients", "--set",
                                "lr=nan"), "lr: Input should be a finite number"),
    "replay corrupt update file": (attack_on(corrupt_update, "--attack", "noop", "--client",
                                             "1"), "cannot read"),
    "replay NaN update": (attack_on(lambda t: make_run(t, nan_update=True), "--attack",
                                    "noop", "--client", "1"), "holds NaN/inf"),
    "replay NaN own update": (attack_on(lambda t: make_run(t, nan_own=True), "--attack",
                                        "noop", "--view", "peer"), "own update holds NaN/inf"),
    "replay record of another model": (attack_on(make_run, "--attack", "idlg", "--client",
                                                 "1"),
                                       "the recorded update has no entry for parameter"),
    # values are what they claim to be; attacks that cannot work are refused before the run
    "defense param a string": (run_with('defenses=[{name="pruning", ratio="0.5"}]'),
                               "defenses[0].ratio: a string where a number is expected"),
    "attack flag 0 (found by test_fuzz_cli)": (
        run_with("attacks.2.adaptive=0"),
        "attacks[2].adaptive: a number or string where true or false is expected (got 0)"),
    "idlg rule on 4-image updates": (run_with('strategy={name="fedavg"}',
                                              "federation.local_steps=2",
                                              "federation.batch_size=2",
                                              'attacks=[{name="idlg", method="idlg", '
                                              'client=1}]'),
                                     "client 1's update in round 1 holds 4 images "
                                     "(local_steps x batch_size = 2 x 2)"),
    "issue 23's IG on 4-image updates": (run_with('strategy={name="fedavg"}',
                                                  "federation.local_steps=2",
                                                  "federation.batch_size=2"),
                                         "attacks[1] (inverting_gradients): labels = 'idlg' "
                                         "(iDLG's label rule) recovers the label of ONE image"),
    "gidm on a classifier": (run_with('attacks=[{name="gidm", client=1}]'),
                             "inverts diffusion updates; task.name = 'classifier'"),
    # model files: safetensors only, library warnings silenced, checked before training
    "pretrained is a pickle": (lambda t: diffusion_with(
        f'model.pretrained="{pickled_pretrained(t)}"')(t),
                               "diffusion_pytorch_model.bin: refusing a pickled checkpoint"),
    "pretrained has no weights": (lambda t: diffusion_with(
        f'model.pretrained="{config_only_pretrained(t)}"')(t),
                                  "no weights (diffusion_pytorch_model.safetensors is missing)"),
    "identity_model is a pickle": (lambda t: run_with(
        f'metrics.identity_model="{pickled_identity(t)}"')(t), "refusing identity.pt"),
    # the other subcommands: list, validate, deploy-local, report
    "list unknown kind": (lambda t: ["list", "gadgets"], "unknown plug-in kind 'gadgets'"),
    "validate string for a number": (lambda t: ["validate", DEFAULT, *_sets(
        "federation.num_rounds=\"3\"")], "federation.num_rounds: a string where a number"),
    "validate missing config": (lambda t: ["validate", str(t / "nope.toml")],
                                "config file not found"),
    "deploy-local lr nan": (lambda t: ["deploy-local", DEFAULT, *_sets("federation.lr=nan")],
                            "federation.lr: Input should be a finite"),
    "report corrupt run.json": (lambda t: ["report", str(_run_file("run.json", "{")(t))],
                                "run.json: corrupt"),
    # train-prior
    "train-prior --out a run dir": (prior_to(make_run), "(a run directory) holds other files"),
    "train-prior --out a file": (prior_to(lambda t: _write(t, "f", "x")), "is a file"),
    "train-prior --out under a file": (prior_to(lambda t: _write(t, "f", "x") / "p"),
                                       "is a file"),
    "train-prior cuda without CUDA": (prior_with('training.device="cuda"'),
                                      "training.device: 'cuda' requested but CUDA is not "
                                      "available"),
    "train-prior torn checkpoint state": (prior_state('{"step": 1, "fi'), "state.json: corrupt"),
    "train-prior state names a missing file": (
        prior_state('{"step": 1, "file": "step-00000001.safetensors"}'), "names a missing file"),
    "train-prior state escapes": (prior_state('{"step": 1, "file": "../../f"}'), "refusing"),
    "train-prior lr a string": (prior_with('training.lr="0.1"'),
                                "training.lr: a string where a number is expected"),
    "train-prior steps 0": (prior_with("training.steps=0"), "training.steps: Input should be"),
    "train-prior filter keeps nothing": (prior_with("filter.classes=[42]"),
                                         "no train example passes it"),
    "train-prior missing config": (lambda t: ["train-prior", str(t / "nope.toml")],
                                   "config file not found"),
    # train-identity
    "train-identity --out a file": (identity(IDENTITY_DATA, lambda t: _write(t, "f", "x")),
                                    "is a file"),
    "train-identity --out a run dir": (identity(IDENTITY_DATA, make_run),
                                       "holds other files and no identity model"),
    "train-identity epochs 0": (identity(IDENTITY_DATA + "[identity]\nepochs = 0\n"),
                                "identity.epochs: Input should be greater than or equal to 1"),
    "train-identity lr nan": (identity(IDENTITY_DATA + "[identity]\nlr = nan\n"),
                              "identity.lr: Input should be a finite number"),
    "train-identity lr a string": (identity(IDENTITY_DATA + '[identity]\nlr = "0.1"\n'),
                                   "identity.lr: a string where a number is expected"),
    "train-identity unknown option": (identity(IDENTITY_DATA + "[identity]\nepoch = 3\n"),
                                      "identity.epoch: unknown key"),
    "train-identity split": (identity(IDENTITY_DATA + '[identity]\nsplit = "val"\n'),
                             "identity.split"),
    "train-identity unknown source": (identity('[data]\nname = "faces"\n'),
                                      "unknown data source 'faces'"),
    "train-identity missing config": (lambda t: ["train-identity", str(t / "nope.toml"),
                                                 "--out", str(t / "m")], "cannot read"),
    # bench
    "bench --out a file": (bench(lambda t: _write(t, "f", "x")), "is a file"),
    "bench --out a run dir": (bench(make_run), "holds other files and no bench"),
    "bench axis no attack takes": (bench(axes='"attack.foo" = [1, 2]'),
                                   "axis 'attack.foo': no attack of the grid takes"),
    "bench name ..": (bench(bench='name = ".."'), "must be a plain directory name"),
    "bench name escapes": (bench(bench='name = "../../outside"'), "plain directory name"),
    "bench name with a separator": (bench(bench='name = "a/b"'), "plain directory name"),
    "bench cell param a string": (bench(axes='"attack.max_iterations" = ["5"]'),
                                  "max_iterations: a string where a number is expected"),
    "bench federation axis bad": (bench(axes='"federation.lr" = [0.1, nan]'),
                                  "federation.lr: Input should be a finite number"),
    "bench iDLG cell on 4-image updates": (
        bench(axes='strategy = [{name = "fedavg"}]\n"federation.local_steps" = [2]\n'
                   '"federation.batch_size" = [2]',
              attack='name = "idlg"\nmethod = "idlg"\nclient = 1'),
        "cell idlg r1: (idlg): method = 'idlg' recovers the label of ONE image"),
    "bench missing grid": (lambda t: ["bench", str(t / "nope.toml")], "grid file not found"),
}

#: Cases that need a machine without CUDA (they ask for it).
NEEDS_NO_CUDA = {"train-prior cuda without CUDA"}


#: Cases that refuse invalid recorded data: they write one error row to attacks.jsonl.
ERROR_ROW_CASES = {"replay NaN update", "replay NaN own update",
                   "replay record of another model"}
