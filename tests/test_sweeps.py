"""Every sweep calls its own script with real flags and values the script parses."""

import dataclasses
import importlib
import itertools
import tomllib
import sys
from pathlib import Path

import pytest
import tyro
import yaml

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
ALGORITHM_SWEEPS = [path for path in SWEEPS if not path.name.startswith("suite_")]
SUITE_SWEEPS = [path for path in SWEEPS if path.name.startswith("suite_")]
sys.path.insert(0, str(REPO / "benchmarks"))
import run_suite  # noqa: E402


def sweep_values(spec):
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return spec["values"]
    return [spec["min"], spec["max"]]


@pytest.mark.parametrize("sweep_path", ALGORITHM_SWEEPS, ids=lambda p: p.name)
def test_every_swept_parameter_is_a_flag_of_its_script(sweep_path):
    sweep = yaml.safe_load(sweep_path.read_text())
    module = importlib.import_module(sweep["program"].removesuffix(".py"))
    flags = {field.name for field in dataclasses.fields(module.Args)}
    unknown = set(sweep["parameters"]) - flags
    assert not unknown, f"{sweep_path.name} sweeps flags its script does not have: {unknown}"
    assert sweep["metric"]["name"] == "eval/penalized_return"
    for name, spec in sweep["parameters"].items():
        for value in sweep_values(spec):  # the way wandb agent passes them: --name=value
            args = tyro.cli(module.Args, args=[f"--{name}={value}"])
            assert getattr(args, name) == type(getattr(args, name))(value)


def test_there_is_a_sweep_per_algorithm():
    assert {p.stem for p in SWEEPS} >= {"cvpo", "ppo_lagrangian", "sac_lagrangian"}


@pytest.mark.parametrize("sweep_path", SUITE_SWEEPS, ids=lambda p: p.name)
def test_a_suite_sweep_runs_exactly_the_cells_of_its_preset(sweep_path):
    sweep = yaml.safe_load(sweep_path.read_text())
    assert sweep["program"] == "benchmarks/run_suite.py" and sweep["method"] == "grid"
    fixed = [f"--{name}={spec['value']}" for name, spec in sweep["parameters"].items() if "value" in spec]
    grid = {name: spec["values"] for name, spec in sweep["parameters"].items() if "values" in spec}
    _, preset = run_suite.parse_args(fixed)
    cells = set()
    for values in itertools.product(*grid.values()):  # the way wandb agent passes them: --name=value
        args, config = run_suite.parse_args(fixed + [f"--{name}={value}" for name, value in zip(grid, values)])
        assert args.workers == 1 and args.results_dir.startswith("benchmarks/results/")
        (job,) = run_suite.make_jobs(config)
        cells.add(job["key"])
    assert cells == {job["key"] for job in run_suite.make_jobs(preset)}


def test_there_is_a_suite_sweep_per_long_preset():
    suite = tomllib.loads((REPO / "benchmarks" / "suite.toml").read_text())
    assert {p.stem.removeprefix("suite_") for p in SUITE_SWEEPS} == set(suite) - {"main", "smoke", "toy", "variants"}
