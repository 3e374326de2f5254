"""The behaviour all three algorithm files share (../shared/design/contract.md), checked file by file:
bad input, NaN handling, interrupt and resume, deterministic resumption, offline tracking, headless
video, and a docstring for every flag."""

import ctypes.util
import dataclasses
import importlib
import inspect
import os
import pickle
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import tyro

from tests.helpers import REPO, TOY_ENV, only_run_dir, read_metrics, run_script, script_command

# Small, fast settings per file on the toy task; budgets below are multiples of every round length.
QUICK_FLAGS = {
    "cvpo_jax.py": ["--learning-starts", 400, "--update-interval", 200, "--batch-size", 64, "--hidden-sizes", 32, 32],
    "ppo_lagrangian_jax.py": ["--num-steps", 100, "--no-anneal-lr", "--update-epochs", 2],
    "sac_lagrangian_jax.py": ["--learning-starts", 400, "--update-interval", 200, "--batch-size", 64,
                              "--hidden-sizes", 32, 32],
}
SCRIPTS = [script for script in QUICK_FLAGS if (REPO / script).exists()]
MULTIPLIER = {"cvpo_jax.py": "charts/estep_lambda", "ppo_lagrangian_jax.py": "charts/lagrange_multiplier",
              "sac_lagrangian_jax.py": "charts/lagrange_multiplier"}


def toy_flags(script, *extra, env_id=TOY_ENV):
    return ["--env-id", env_id, "--num-envs", 2, "--no-async-envs", "--eval-every", 0, "--eval-episodes", 1,
            *QUICK_FLAGS[script], *extra]


BAD_INPUTS = [
    (["--env-id", "SafetyPointGoal9-v0"], r"unknown env id 'SafetyPointGoal9-v0'; did you mean .*SafetyPointGoal1-v0"),
    (["--env-id", "SafetyPointGoal1"], r"unknown env id 'SafetyPointGoal1'; did you mean"),
    (["--env-id", "SafetyCarCircl-v0"], r"unknown env id 'SafetyCarCircl-v0'; did you mean SafetyCarCircle-v0,"),
    (["--num-envs", 0], r"--num-envs must be positive, got 0"),
    (["--num-envs", -2], r"--num-envs must be positive, got -2"),
    (["--total-timesteps", 0], r"--total-timesteps must be positive, got 0"),
    (["--cost-limit", -1], r"--cost-limit must be non-negative, got -1"),
    (["--resume", "no/such/checkpoint.pkl"], r"no checkpoint file at no/such/checkpoint.pkl"),
    (["--env-id", "no_such_module:Env-v0"], r"cannot import module 'no_such_module'"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, message", BAD_INPUTS)
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(script, flags, message, tmp_path):
    result = run_script(script, *flags, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), result.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("script", SCRIPTS)
def test_zero_cost_limit_trains_with_finite_numbers(script, tmp_path):
    run_script(script, *toy_flags(script, "--cost-limit", 0, "--total-timesteps", 1200), cwd=tmp_path)
    records = read_metrics(only_run_dir(tmp_path))
    assert any(MULTIPLIER[script] in r for r in records)
    assert all(np.isfinite(value) for r in records for value in r.values())
    episodes = [r for r in records if "charts/episodic_cost" in r]
    assert episodes and all(r["charts/episodes_ended"] >= 1 for r in episodes)
    for r in episodes:  # with d = 0 each episode's violation is its cost
        np.testing.assert_allclose(r["charts/cost_violation"], r["charts/episodic_cost"], rtol=1e-6)


@pytest.mark.parametrize("script", SCRIPTS)
def test_nan_stops_the_run_naming_the_quantity_and_step_after_a_checkpoint(script, tmp_path):
    flags = toy_flags(script, "--total-timesteps", 4000, env_id="tests.constrained_speed:BrokenSpeed-v0")
    result = run_script(script, *flags, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert re.search(r"error: \S+ became (nan|inf|-inf) at global step \d+", result.stderr), result.stderr[-2000:]
    checkpoint = only_run_dir(tmp_path) / "checkpoints" / "checkpoint.pkl"
    with open(checkpoint, "rb") as file:
        saved = pickle.load(file)
    leaves = [np.asarray(x) for x in _leaves(saved["state"])]
    assert all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")  # the last finite state


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


@pytest.mark.parametrize("script", SCRIPTS)
def test_interrupted_run_checkpoints_and_resumes_where_it_stopped(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    flags = toy_flags(script, "--total-timesteps", 400_000, "--save-model", "--checkpoint-every", 100_000)
    process = subprocess.Popen(script_command(script, *flags), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the multiplier has been logged a few times
        time.sleep(1)
        metrics_files = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if metrics_files and sum(MULTIPLIER[script] in line for line in open(metrics_files[0])) >= 3:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    match = re.search(r"interrupted at global step (\d+); resume with --resume (\S+)", stderr)
    assert match, stderr[-2000:]
    stopped_at, checkpoint = int(match.group(1)), tmp_path / match.group(2)  # printed relative to the run
    with open(checkpoint, "rb") as file:
        saved = pickle.load(file)
    assert saved["global_step"] == stopped_at > 0
    before = read_metrics(only_run_dir(tmp_path))
    assert before[-1]["global_step"] <= stopped_at

    run_script(script, "--resume", checkpoint, "--total-timesteps", stopped_at + 1200, cwd=tmp_path)
    after = read_metrics(only_run_dir(tmp_path))[len(before):]
    assert after and all(r["global_step"] > stopped_at for r in after)  # continues, does not restart
    assert after[-1]["global_step"] == stopped_at + 1200
    resumed_multipliers = [r[MULTIPLIER[script]] for r in after if MULTIPLIER[script] in r]
    assert resumed_multipliers
    with open(checkpoint, "rb") as file:
        final = pickle.load(file)
    assert final["global_step"] == stopped_at + 1200


@pytest.mark.parametrize("script", SCRIPTS)
def test_resumed_run_matches_an_uninterrupted_one(script, tmp_path):
    """The off-policy files run with acting overlapping learning: the round in flight at the checkpoint and the
    acting actor one round behind must both carry over."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    overlap = [] if script == "ppo_lagrangian_jax.py" else ["--overlap-learning"]
    run_script(script, *toy_flags(script, "--total-timesteps", 2400, "--save-model", *overlap), cwd=straight)
    run_script(script, *toy_flags(script, "--total-timesteps", 1200, "--save-model", *overlap), cwd=split)
    checkpoint = only_run_dir(split) / "checkpoints" / "checkpoint.pkl"
    run_script(script, "--resume", checkpoint, "--total-timesteps", 2400, cwd=split)

    def training_records(cwd):
        return [r for r in read_metrics(only_run_dir(cwd)) if r["global_step"] > 1200 and "charts/SPS" not in r
                and not any(k.startswith("eval/") for k in r)]

    assert training_records(split) == training_records(straight)
    with open(only_run_dir(straight) / "checkpoints" / "checkpoint.pkl", "rb") as file:
        expected = [np.asarray(x) for x in _leaves(pickle.load(file)["state"])]
    with open(checkpoint, "rb") as file:
        resumed = [np.asarray(x) for x in _leaves(pickle.load(file)["state"])]
    assert len(expected) == len(resumed)
    for a, b in zip(expected, resumed):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("script", [script for script in SCRIPTS if script != "ppo_lagrangian_jax.py"])
def test_resume_ends_the_interrupted_episodes_in_the_replay_buffer(script, tmp_path):
    """A run stopped 5 steps into a toy episode (20 steps): the resumed envs start new episodes, so its newest
    buffer row must become an episode end, or n-step targets would run on into the next episode."""
    run_script(script, *toy_flags(script, "--total-timesteps", 1210, "--save-model"), cwd=tmp_path)
    checkpoint = only_run_dir(tmp_path) / "checkpoints" / "checkpoint.pkl"
    with open(checkpoint, "rb") as file:
        saved = pickle.load(file)
    newest_row = saved["buffer_position"] - 1
    assert not saved["buffer"]["episode_ended"][newest_row].any()
    run_script(script, "--resume", checkpoint, "--total-timesteps", 1400, "--save-model", cwd=tmp_path)
    with open(checkpoint, "rb") as file:
        resumed = pickle.load(file)
    assert resumed["buffer"]["episode_ended"][newest_row].all()
    assert not resumed["buffer"]["episode_ended"][newest_row - 1].any()


@pytest.mark.parametrize("script", SCRIPTS)
def test_progress_lines_when_stdout_is_not_a_terminal(script, tmp_path):
    result = run_script(script, *toy_flags(script, "--total-timesteps", 1200, "--progress-every", 0.2), cwd=tmp_path)
    lines = re.findall(r"^global step ([\d,]+)/1,200: [\d,]+ steps/s, (?:return|no episode)", result.stdout, re.M)
    assert lines and all(0 < int(step.replace(",", "")) <= 1200 for step in lines), result.stdout[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_tracking_without_a_wandb_login_runs_offline(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path), WANDB_SILENT="true")  # no ~/.netrc: no login
    result = subprocess.run(script_command(script, *toy_flags(script, "--total-timesteps", 600, "--track")),
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert read_metrics(run_dir)[-1]["global_step"] == 600


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_rejects_a_negative_value_with_one_line(script):
    """Checked in-process on validate_args: -1 is nonsense for every number but the seed."""
    module = importlib.import_module(script.removesuffix(".py"))
    numeric = [field.name for field in dataclasses.fields(module.Args)
               if field.name != "seed" and re.search(r"\b(int|float)\b", str(field.type)) and "tuple" not in str(field.type)]
    assert len(numeric) > 10
    for name in [*numeric, "hidden_sizes"]:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit) as stopped:
            module.validate_args(tyro.cli(module.Args, args=[flag, "-1"]))
        assert str(stopped.value.code).startswith("error: ") and flag in str(stopped.value.code), (flag, stopped.value)


VIDEO_FLAGS = {
    "cvpo_jax.py": ["--learning-starts", 100, "--update-interval", 100, "--batch-size", 32, "--hidden-sizes", 16],
    "ppo_lagrangian_jax.py": ["--num-steps", 100, "--update-epochs", 1],
    "sac_lagrangian_jax.py": ["--learning-starts", 100, "--update-interval", 100, "--batch-size", 32,
                              "--hidden-sizes", 16],
}


@pytest.mark.skipif(not ctypes.util.find_library("OSMesa"), reason="headless video needs libosmesa6 (MUJOCO_GL=osmesa)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_capture_video_records_the_evaluation_episodes_headless(script, tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    run_script(script, "--env-id", "SafetyCarCircle1-v0", "--num-envs", 2, "--no-async-envs", "--total-timesteps", 200,
               "--eval-every", 0, "--eval-episodes", 1, "--capture-video", *VIDEO_FLAGS[script], cwd=tmp_path)
    (video,) = (only_run_dir(tmp_path) / "videos").glob("*.mp4")
    assert video.stat().st_size > 10_000


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_one_line_docstring(script):
    """--help is the documentation: each Args field is followed by its docstring."""
    module = importlib.import_module(script.removesuffix(".py"))
    lines = [line.strip() for line in inspect.getsource(module.Args).splitlines()]
    for field in dataclasses.fields(module.Args):
        (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{field.name}:")]
        docstring = lines[index + 1]
        assert docstring.startswith('"""') and docstring.endswith('"""') and len(docstring) > 10, field.name
