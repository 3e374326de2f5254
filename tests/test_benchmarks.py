"""Smoke tests of benchmarks/: a tiny suite on the toy task, its aggregation, and the throughput script (ours only)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import aggregate  # noqa: E402
import run_suite  # noqa: E402


def run(*command, timeout=120):
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def test_suite_runs_skips_finished_runs_and_aggregates(tmp_path):
    results = tmp_path / "results"
    out = run("benchmarks/run_suite.py", "--preset", "smoke", "--results-dir", str(results))
    run_dir = results / "runs" / "cvpo__ConstrainedSpeed-v0__1"
    assert (run_dir / "DONE").exists(), out
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and info["sessions"][-1]["returncode"] == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["global_step"] for r in records) == 600
    assert any("charts/episodic_cost" in r for r in records) and any("eval/episodic_return" in r for r in records)
    assert list(run_dir.glob("runs/*/checkpoints/checkpoint.pkl")), "runs are started with --save-model"

    again = run("benchmarks/run_suite.py", "--preset", "smoke", "--results-dir", str(results))
    assert "started" not in again and "done: 1" in again  # a finished run is skipped

    run("benchmarks/aggregate.py", "--results-dir", str(results))
    table = (results / "learning.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| CVPO | 1 (1)"))
    assert "600 / 600" in row
    plot = results / "learning_ConstrainedSpeed-v0.png"
    assert plot.exists() and plot.read_bytes()[:4] == b"\x89PNG"


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"global_step": s, "charts/episodic_return": float(s)}) for s in (100, 200, 300, 400)]
    path.write_text("\n".join(lines) + '\n{"global_step": 5')  # the last line was cut off by a kill
    run_suite.truncate_metrics(str(path), 200)
    assert [json.loads(line)["global_step"] for line in path.read_text().splitlines()] == [100, 200]
    # the aggregator also tolerates a file where a resumed run logged steps again
    resumed = [json.dumps({"global_step": s, "x": 1}) for s in (300, 400)]
    path.write_text("\n".join(lines + resumed) + "\n")
    records = aggregate.load_records(str(path))
    assert [r["global_step"] for r in records] == [100, 200, 300, 400] and all(r.get("x") for r in records[2:])


def test_suite_command_line(tmp_path):
    args, config = run_suite.parse_args(["--preset", "main", "--seeds", "7", "--algo-args", "cvpo=--num-sampled-actions 32",
                                         "--results-dir", str(tmp_path)])
    jobs = run_suite.make_jobs(config)
    assert len(jobs) == 3 * 2 and {job["seed"] for job in jobs} == {7}
    cvpo = next(job for job in jobs if job["algorithm"] == "cvpo" and job["env_id"] == "SafetyCarCircle1-v0")
    assert cvpo["key"] == "cvpo__SafetyCarCircle1-v0__7"
    assert cvpo["command"][-2:] == ["--num-sampled-actions", "32"] and "--save-model" in cvpo["command"]
    assert cvpo["command"][cvpo["command"].index("--total-timesteps") + 1] == str(config["total_timesteps"]["SafetyCarCircle1-v0"])


def test_throughput_smoke(tmp_path):
    output = tmp_path / "throughput.md"
    run("benchmarks/throughput.py", "--smoke", "--output", str(output))
    report = output.read_text()
    assert "Machine: " in report and "Command: `python benchmarks/throughput.py --smoke" in report
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["env"]["steps_per_second"] > 0
    assert data["train"]["ours/CVPO"]["steps_per_second"] > 0
    assert data["learner"]["ours_fsrl"]["16"]["ms"] > 0 and data["learner"]["ours_newton"]["16"]["ms"] > 0
    assert min(data["learner"]["ours_newton"]["16"]["parts"].values()) > 0 and "spends its time" in report
    assert "fsrl" not in data["learner"]  # --smoke never touches FSRL or its venv


def test_steps_to_target_and_cumulative_violation(tmp_path):
    # 10 bins of 100 steps: the return reaches 5 from step 300 on, the cost dips under the limit (10) at 200 but
    # exceeds it again at 500, and stays under it from 600 on, so the target is kept from the bin ending at 700.
    returns = [0, 1, 3, 5, 6, 6, 7, 7, 8, 8]
    costs = [30, 20, 9, 9, 9, 25, 8, 8, 8, 8]
    run_dir = tmp_path / "runs" / "cvpo__Toy-v0__1"
    run_dir.mkdir(parents=True)
    records = [{"global_step": 100 * i + 50, "charts/episodic_return": r, "charts/episodic_cost": c,
                "charts/episodes_ended": 2, "charts/cost_violation": max(0, c - 10) + (i == 0), "charts/cost_limit": 10}
               for i, (r, c) in enumerate(zip(returns, costs))] + [{"global_step": 1000}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run, ) = aggregate.load_runs(str(tmp_path))
    assert aggregate.steps_to_target(run, 5.0, 10.0, bins=10) == 700
    assert aggregate.steps_to_target(run, 9.0, 10.0, bins=10) is None
    assert run["cumulative_violation"] == 2 * (21 + 10 + 15)


def test_fsrl_cells_run_the_driver_with_every_flag_our_scripts_get():
    _, config = run_suite.parse_args(["--preset", "bullet_fsrl"])
    jobs = {job["algorithm"]: job for job in run_suite.make_jobs(config) if job["seed"] == 1}
    fsrl, ours = jobs["fsrl_cvpo"], jobs["cvpo"]
    assert fsrl["fsrl"] and not ours["fsrl"]
    assert fsrl["command"][0].endswith("fsrl_driver.py") and fsrl["command"][1:4] == ["run", "--algo", "cvpo"]
    assert fsrl["command"][6:] == ours["command"][3:]  # after --exp-name: the same flags and values on both sides
    driver = open(os.path.join(REPO_ROOT, "benchmarks", "fsrl_driver.py")).read()  # it imports torch: read, not import
    for flag in [token for token in fsrl["command"] if token.startswith("--")] + ["--resume"]:
        assert f'"{flag}"' in driver, flag


def test_a_variant_runs_its_base_script_with_the_base_flags_then_its_own():
    variants = {"cvpo_single_critic": {"algorithm": "cvpo", "args": ["--no-double-critic"]},
                "fsrl_cvpo_k32": {"algorithm": "fsrl_cvpo", "args": ["--num-sampled-actions", "32"]}}
    config = dict(run_suite.DEFAULTS, variants=variants, algorithms=["cvpo", "cvpo_single_critic", "fsrl_cvpo_k32"],
                  extra_args=["--num-envs", "2"], algo_args={"cvpo": ["--gamma", "0.97"], "fsrl_cvpo": ["--n-step", "2"],
                                                             "cvpo_single_critic": ["--tau", "0.01"]})
    base, variant, fsrl_variant = run_suite.make_jobs(config)
    assert variant["key"] == "cvpo_single_critic__SafetyPointGoal1-v0__1" and not variant["fsrl"]
    assert variant["command"][:3] == [base["command"][0], "--exp-name", "cvpo_single_critic"]
    assert base["command"][0].endswith("cvpo_jax.py") and base["command"][-4:] == ["--num-envs", "2", "--gamma", "0.97"]
    assert variant["command"][3:] == base["command"][3:] + ["--no-double-critic", "--tau", "0.01"]
    assert fsrl_variant["fsrl"] and fsrl_variant["command"][0].endswith("fsrl_driver.py")
    assert fsrl_variant["command"][-4:] == ["--n-step", "2", "--num-sampled-actions", "32"]


@pytest.mark.parametrize("variant", ['{ algorithm = "cvpo2", args = [] }', '{ algorithm = "cvpo", args = "--x" }',
                                     '{ algorithm = "cvpo" }'])
def test_a_malformed_variant_or_a_missing_suite_file_is_refused_in_one_line(tmp_path, variant, capsys):
    suite_file = tmp_path / "suite.toml"
    suite_file.write_text(f"[variants]\nbad = {variant}\n[main]\nalgorithms = ['cvpo']\n")
    for argv in (["--suite-file", str(suite_file)], ["--suite-file", str(tmp_path / "none.toml")]):
        with pytest.raises(SystemExit):
            run_suite.parse_args(argv)
        assert capsys.readouterr().err.strip().splitlines()[-1].split(": error: ")[1]
    with pytest.raises(SystemExit):
        run_suite.parse_args(["--preset", "variants"])  # the table of variants is not a preset


def test_summary_puts_published_figures_beside_ours_and_compares_cvpo_with_each_baseline(tmp_path):
    for algorithm, final_return, final_cost in (("cvpo", 500.0, 8.0), ("ppo_lagrangian", 450.0, 12.0),
                                                ("cvpo_single_critic", 480.0, 6.0)):  # a variant of CVPO
        run_dir = tmp_path / "runs" / f"{algorithm}__SafetyCarRun-v0__1"
        run_dir.mkdir(parents=True)
        records = [{"global_step": 100 * i, "charts/episodic_return": final_return, "charts/episodic_cost": final_cost,
                    "charts/episodes_ended": 1, "charts/cost_violation": max(0.0, final_cost - 10), "charts/cost_limit": 10}
                   for i in range(1, 11)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if algorithm != "cvpo_single_critic":
            (run_dir / "DONE").write_text("")
    table = open(aggregate.main(["--results-dir", str(tmp_path), "--target-bins", "10"])).read()
    cvpo_row = next(line for line in table.splitlines() if line.startswith("| SafetyCarRun-v0 (10) | CVPO |"))
    assert cvpo_row.endswith("| 1 (1) | 1,000 | 500.0 | 8.0 | n/a | n/a | 0 | 0k (1/1) | CVPO: ~542 / ~11 (0.3M) |")
    ppo_row = next(line for line in table.splitlines() if line.startswith("| SafetyCarRun-v0 (10) | PPO-Lag |"))
    assert ppo_row.endswith("| 20 | never (0/1) | — |")  # no published PPO-Lag figure on this task
    against = next(line for line in table.splitlines() if line.startswith("| SafetyCarRun-v0 | PPO-Lag |"))
    assert against == ("| SafetyCarRun-v0 | PPO-Lag | 500.0 vs 450.0 (+50.0) | 8.0 vs 12.0 (-4.0) | n/a | 0 / 20 | "
                       "1/1 against 0/1 |")
    variant = next(line for line in table.splitlines()
                   if line.startswith("| SafetyCarRun-v0 (10) | CVPO, --no-double-critic |"))
    assert variant.endswith("| CVPO: ~542 / ~11 (0.3M) |")  # a variant gets its method's published figure
    assert ("| SafetyCarRun-v0 | CVPO, --no-double-critic (runs unfinished) | 500.0 vs 480.0 (+20.0) | 8.0 vs 6.0 (+2.0) |"
            in table)


def test_wall_minutes_is_a_lower_bound_where_a_runner_was_killed_and_counts_a_session_under_way_to_now():
    ended = {"status": "done", "sessions": [{"started": 0.0, "seconds": 600.0, "returncode": 1},
                                            {"started": 1.0, "seconds": 300.0, "returncode": 0}]}
    assert aggregate.wall_minutes(ended, 1e6) == (15.0, False)
    killed = {"status": "done", "sessions": [{"started": 0.0, "seconds": 120.0, "returncode": None},  # heartbeat
                                             {"started": 1.0, "seconds": None, "returncode": None},  # none yet
                                             {"started": 2.0, "seconds": 300.0, "returncode": 0}]}
    assert aggregate.wall_minutes(killed, 1e6) == (7.0, True)
    started = time.time() - 600
    under_way = {"status": "running", "sessions": [{"started": 0.0, "seconds": 600.0, "returncode": 0},
                                                   {"started": started, "seconds": None, "returncode": None}]}
    minutes, lower_bound = aggregate.wall_minutes(under_way, 5.0)
    assert 19.9 < minutes < 20.5 and not lower_bound
    assert aggregate.wall_minutes(under_way, 1e6) == (10.0, True)  # its runner stopped writing long ago: killed


def test_runner_records_the_session_time_while_a_run_is_under_way_and_its_end(tmp_path):
    args, config = run_suite.parse_args(["--results-dir", str(tmp_path)])
    runner = run_suite.Runner(args, config)
    run_dir = tmp_path / "runs" / "cvpo__Task__1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "running", "sessions": [
        {"started": 0.0, "seconds": 60.0, "returncode": 0}, {"started": time.time(), "seconds": None}]}))
    runner.record_session("cvpo__Task__1", time.time() - 30)
    info = json.loads((run_dir / "run.json").read_text())
    assert 29 < info["sessions"][-1]["seconds"] < 40 and info["sessions"][-1]["returncode"] is None
    assert 89 < info["wall_seconds"] < 100 and info["status"] == "running"
    runner.record_session("cvpo__Task__1", time.time() - 45, returncode=0, status="done")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["sessions"][-1]["returncode"] == 0 and info["status"] == "done" and 104 < info["wall_seconds"] < 115


def test_flags_in_a_runs_recorded_command_set_the_bounds_of_its_tables(tmp_path):
    run_dir = tmp_path / "runs" / "sac_lagrangian__SafetyCarRun-v0__1"
    run_dir.mkdir(parents=True)
    records = [{"global_step": 100 * i, "charts/episodic_return": 1.0, "charts/episodic_cost": 2.0,
                "charts/episodic_length": 200, "charts/q_cost": 3.0} for i in range(1, 11)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "run.json").write_text(json.dumps({"command": "python sac_lagrangian_jax.py --gamma 0.9 --n-step 2"}))
    table = open(aggregate.main(["--results-dir", str(tmp_path)])).read()
    row = next(line for line in table.splitlines() if line.startswith("| sac_lagrangian__SafetyCarRun-v0__1 |"))
    assert row.split(" | ")[4] == "10"  # the largest possible Q_c, 1 / (1 - gamma), with the run's own gamma
    (run_dir / "run.json").write_text(json.dumps({"command": "python sac_lagrangian_jax.py --n-step 2"}))
    table = open(aggregate.main(["--results-dir", str(tmp_path)])).read()
    row = next(line for line in table.splitlines() if line.startswith("| sac_lagrangian__SafetyCarRun-v0__1 |"))
    assert row.split(" | ")[4] == "100"  # without the flag, the script's own default gamma 0.99


@pytest.mark.parametrize("algorithm", ["cvpo", "ppo_lagrangian", "sac_lagrangian", "cvpo_single_critic"])
def test_the_defaults_read_from_a_scripts_source_are_its_args_defaults(algorithm):
    base = aggregate.VARIANTS.get(algorithm, (algorithm, []))[0]
    spec = importlib.util.spec_from_file_location(f"{base}_script", run_suite.script_path(base))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.Args()
    defaults = aggregate.script_defaults(algorithm)
    assert {"--gamma", "--cost-limit", "--seed"} <= defaults.keys()
    for flag, value in defaults.items():
        assert getattr(args, flag[2:].replace("-", "_")) == value, flag
