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


