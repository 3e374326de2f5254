"""Every sweep calls its own script with real flags and values the script parses."""

import dataclasses
import importlib
from pathlib import Path

import pytest
import tyro
import yaml

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def sweep_values(spec):
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return spec["values"]
    return [spec["min"], spec["max"]]


@pytest.mark.parametrize("sweep_path", SWEEPS, ids=lambda p: p.name)
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
