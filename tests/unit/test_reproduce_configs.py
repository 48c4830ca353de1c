"""configs/reproduce/: every paper-scale config validates with the CPU-sized overrides its
header lists, and its placeholder paths stop ``fl-sim run`` with one line naming the path.

The CPU overrides are read from each config's own header comment (the ``fl-sim run
configs/reproduce/<name>.toml \\`` block after "CPU-sized variant"), so the test checks the
very command the docs tell users to run. A placeholder is any path starting with
``/PATH/TO/``. Neither test starts Ray (the ``no_ray`` fixture fails the test if it would).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from fl_sim import cli, config
from fl_sim.train_prior import prior_config

ROOT = Path(__file__).resolve().parents[2]
REPRO = ROOT / "configs" / "reproduce"
PLACEHOLDER = "/PATH/TO/"
#: experiment configs (prior_olivetti.toml is a train-prior config, checked on its own)
EXPERIMENTS = sorted(p.name for p in REPRO.glob("*.toml") if not p.name.startswith("prior_"))
#: on this CPU-only machine the GPU client_resources are refused first; these two overrides
#: let the data / checkpoint checks speak (they change nothing about the paths)
CPU_RESOURCES = ["run.device=\"cpu\"", "federation.client_resources={num_cpus = 1}"]


def cpu_overrides(path: Path) -> list[str]:
    """The ``--set`` values of the CPU-variant command in ``path``'s header comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "CPU-sized variant" in line)
    cmd = next(i for i in range(start, len(lines))
               if lines[i].lstrip("# ").startswith(f"fl-sim run configs/reproduce/{path.name}"))
    parts = []
    for line in lines[cmd:]:
        text = line.lstrip("#").strip()
        parts.append(text.rstrip("\\").strip())
        if not text.endswith("\\"):
            break
    argv = shlex.split(" ".join(parts))
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_the_five_settings_are_there() -> None:
    # GIDM and GIDM+ on both public DDPMs, GIAS, user-level, curious peer
    assert set(EXPERIMENTS) == {
        "gidm_cifar10.toml", "gidm_celebahq256.toml", "gidm_plus_cifar10.toml",
        "gidm_plus_celebahq256.toml", "gias_faces64.toml", "user_level_celeba.toml",
        "peer_cifar10.toml"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cpu_variant_validates_without_placeholders(name: str) -> None:
    path = REPRO / name
    overrides = cpu_overrides(path)
    assert len(overrides) >= 5, overrides
    full = config.load(path)  # the paper-scale config itself validates too
    assert PLACEHOLDER in json.dumps(full.to_json_dict())
    cpu = config.load(path, overrides)
    resolved = json.dumps(cpu.to_json_dict())
    assert PLACEHOLDER not in resolved, f"{name}: CPU variant still needs a placeholder path"
    assert cpu.run.device == "cpu"
    assert cpu.data.name in {"digits", "npz"}


def _run_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error: "), err
    assert "Traceback" not in err
    assert not list(work.rglob("*")), "a refused run wrote files"
    return lines[0]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_data_placeholder_is_one_line_error(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], no_ray: None, keep_logging: None) -> None:
    path = REPRO / name
    argv = ["run", str(path)]
    for o in CPU_RESOURCES:
        argv += ["--set", o]
    line = _run_error(tmp_path, monkeypatch, capsys, argv)
    placeholder = str(config.load(path).data.params["path"])
    assert placeholder.startswith(PLACEHOLDER) and placeholder in line, line


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.startswith("gidm")])
def test_checkpoint_placeholder_is_one_line_error(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], no_ray: None, keep_logging: None) -> None:
    """With local data given (the CPU variant's digits), the next missing path -- the
    public DDPM checkpoint in model.pretrained -- is named in one line."""
    path = REPRO / name
    argv = ["run", str(path), "--set", cpu_overrides(path)[0]]  # the data section
    for o in CPU_RESOURCES:
        argv += ["--set", o]
    line = _run_error(tmp_path, monkeypatch, capsys, argv)
    assert "model.pretrained" in line and PLACEHOLDER in line, line


WITH_PRIOR = [n for n in EXPERIMENTS
              if any("prior" in a.params for a in config.load(REPRO / n).attacks)]


@pytest.mark.parametrize("name", WITH_PRIOR)
def test_attack_prior_placeholder_is_one_line_error_before_ray(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], no_ray: None, keep_logging: None) -> None:
    """With local data given, an attack's ``prior`` placeholder stops the run before Ray
    starts (it used to run the whole federation and fail in the attack at its end)."""
    path = REPRO / name
    # the data section; its repo-relative ../shared path made absolute (the test runs elsewhere)
    data = cpu_overrides(path)[0].replace('"../shared/', f'"{ROOT.parent}/shared/')
    argv = ["run", str(path), "--set", data]
    for o in CPU_RESOURCES:
        argv += ["--set", o]
    line = _run_error(tmp_path, monkeypatch, capsys, argv)
    assert ".prior" in line and PLACEHOLDER in line, line


def test_olivetti_prior_never_sees_the_attacked_people() -> None:
    cfg = prior_config(REPRO / "prior_olivetti.toml")
    # user_level_celeba.toml's CPU variant attacks client 0 = person 0 (by_identity, 40
    # clients); the prior must be trained on other people only
    assert cfg.filter.groups is not None and not set(range(10)) & set(cfg.filter.groups)
    assert "priors/olivetti_others" in (REPRO / "user_level_celeba.toml").read_text()


#: the digits CPU variants whose prior (and, for GIDM+, global model) is priors/digits_public
DIGITS_PUBLIC_PRIOR = ("gias_faces64.toml", "peer_cifar10.toml", "gidm_plus_cifar10.toml",
                       "gidm_plus_celebahq256.toml")


@pytest.mark.parametrize("name", DIGITS_PUBLIC_PRIOR)
def test_digits_prior_never_sees_a_client_training_image(name: str) -> None:
    """Clients train on the digits TRAIN split; the prior of these variants is trained on the
    TEST split only, so no attacked image can be among its (configs/prior_digits.toml, classes
    0-4 of the TRAIN split, shared images with an iid client's batch). The measured
    prior_overlap of every CPU run was 0 (docs/reproduce.md, "CPU-sized variants")."""
    cfg = prior_config(REPRO / "prior_digits_public.toml")
    assert cfg.filter.split == "test" and cfg.data.name == "digits"
    cpu = config.load(REPRO / name, cpu_overrides(REPRO / name))
    assert cpu.data.name == "digits"
    assert [a.params.get("prior") for a in cpu.attacks] == ["priors/digits_public"]
    if name.startswith("gidm_plus"):  # the pretrained global model, as the GPU config's
        assert cpu.model.pretrained == "priors/digits_public"
