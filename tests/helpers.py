import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
TOY_ENV = "tests.constrained_speed:ConstrainedSpeed-v0"
sys.path.insert(0, str(REPO))  # the algorithm files are top-level scripts


def script_command(script, *flags):
    return [sys.executable, str(REPO / script), *map(str, flags)]


def run_script(script, *flags, cwd, timeout=600, check=True):
    """Run an algorithm file in a subprocess whose ./runs lands in cwd; the toy task stays importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(script_command(script, *flags), cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert not check or result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as file:
        return [json.loads(line) for line in file]


def only_run_dir(cwd):
    run_dirs = list((Path(cwd) / "runs").iterdir())
    assert len(run_dirs) == 1, f"expected one run directory in {cwd}/runs, found {run_dirs}"
    return run_dirs[0]




# One sequence of (mean episodic cost, episodes it averages) for the PID multiplier of both Lagrangian files, under a
# limit of 25; the first cost is below the limit, so a controller without a derivative kick starts at lambda = 0.
PID_COST_LIMIT = 25.0
PID_COSTS = [(16.9, 3), (40.0, 4), (60.0, 2), (30.0, 4), (10.0, 1), (0.0, 4), (0.0, 4), (26.0, 3)]
FSRL_GAINS = (0.05, 0.0005, 0.1)  # kp, ki, kd


def fsrl_pid_multipliers(costs, cost_limit, kp, ki, kd):
    """FSRL's LagrangianOptimizer.step (fsrl/utils/optim_util.py) in its own error form; its previous error starts
    at 0, so the first derivative term is [J_c - d]^+."""
    integral = previous_error = 0.0
    multipliers = []
    for cost in costs:
        error = cost - cost_limit
        integral = max(0.0, integral + error)
        multipliers.append(max(0.0, kp * error + ki * integral + kd * max(0.0, error - previous_error)))
        previous_error = error
    return multipliers
