"""Run a learning-quality suite: algorithms x tasks x seeds, resumable, in a pool of subprocesses.

    python benchmarks/run_suite.py --preset main                 # the committed suite (benchmarks/suite.toml)
    python benchmarks/run_suite.py --algorithms cvpo --env-ids SafetyPointGoal1-v0 --seeds 1 2 \
        --total-timesteps 100000 --algo-args cvpo="--num-sampled-actions 32"

Each run lives in its own directory, results/runs/<algo>__<env>__<seed>/ (under --results-dir):
  metrics.jsonl   the run's metrics (a copy of the script's runs/<run_name>/metrics.jsonl, kept in sync)
  run.json        the command, the status, and the wall-clock seconds of every session
  DONE            written after the script exited 0; a finished run is skipped
  stdout.log      the script's output (not committed)
  runs/<run_name>/ the script's own run directory (cwd of the subprocess), with checkpoints/
Runs are started with --save-model --checkpoint-every, so starting the suite again resumes an
unfinished run from its last checkpoint (the metrics logged after that checkpoint are dropped first)
and restarts a run that never reached a checkpoint. Stopping the runner (Ctrl-C, SIGTERM) asks every
run to write a checkpoint and exit. A lock file per run keeps two runners off the same run, even
when an earlier runner was killed while its subprocess is still alive.
"""

import argparse
import fcntl
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
ALGORITHM_SCRIPTS = {"cvpo": "cvpo_jax.py", "ppo_lagrangian": "ppo_lagrangian_jax.py",
                     "sac_lagrangian": "sac_lagrangian_jax.py"}
# The CVPO authors' own implementation (FSRL), trained by benchmarks/fsrl_driver.py in FSRL's virtual environment
# (benchmarks/throughput.py creates it on first use) with the same flags as our scripts.
FSRL_ALGORITHMS = {"fsrl_cvpo": "cvpo"}
STOP_GRACE_SECONDS = 180  # after a stop request, runs still alive this long are killed
HEARTBEAT_SECONDS = 30  # how often a running run's metrics and wall-clock are written to its directory
DEFAULTS = {"algorithms": ["cvpo"], "env_ids": ["SafetyPointGoal1-v0"], "seeds": [1], "cost_limit": 25.0,
            "num_envs": 4, "checkpoint_every": 20_000, "eval_every": 50_000, "eval_episodes": 5,
            "total_timesteps": 100_000, "extra_args": [], "algo_args": {}}


def script_path(algorithm):
    name = ALGORITHM_SCRIPTS.get(algorithm, algorithm if algorithm.endswith(".py") else f"{algorithm}_jax.py")
    return name if os.path.isabs(name) else os.path.join(REPO_ROOT, name)


def script_command(algorithm):
    if algorithm in FSRL_ALGORITHMS:
        return [os.path.join(BENCHMARKS_DIR, "fsrl_driver.py"), "run", "--algo", FSRL_ALGORITHMS[algorithm]]
    return [script_path(algorithm)]


def env_label(env_id):
    return env_id.split(":")[-1]


def run_key(algorithm, env_id, seed):
    return f"{algorithm}__{env_label(env_id)}__{seed}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a table of --suite-file (e.g. main, smoke); flags given here override it")
    parser.add_argument("--suite-file", default=os.path.join(BENCHMARKS_DIR, "suite.toml"))
    parser.add_argument("--algorithms", nargs="+",
                        help="cvpo, ppo_lagrangian, sac_lagrangian (or a script path); fsrl_cvpo: FSRL's own CVPO; "
                             "or a variant of --suite-file's [variants] table, e.g. cvpo_double_critic, which gets its "
                             "base algorithm's flags (the preset's and --algo-args') and then its own")
    parser.add_argument("--env-ids", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--total-timesteps", type=int, help="env steps per run (the preset may set one per task)")
    parser.add_argument("--cost-limit", type=float)
    parser.add_argument("--num-envs", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-episodes", type=int)
    parser.add_argument("--extra-args", help="flags passed to every script, one shell-quoted string")
    parser.add_argument("--algo-args", action="append", default=[], metavar="ALGO=FLAGS",
                        help="flags for one algorithm, e.g. cvpo='--num-sampled-actions 32' (repeatable)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 1),
                        help="runs at a time (default: CPU cores)")
    parser.add_argument("--results-dir", default=os.path.join(BENCHMARKS_DIR, "results"))
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the scripts")
    parser.add_argument("--wait-for-scripts", action="store_true",
                        help="when only runs whose script does not exist yet remain, poll for it instead of exiting")
    parser.add_argument("--retry-failed", type=int, default=0, help="restarts of a failed run within this invocation")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)

    config = dict(DEFAULTS)
    suite = {}
    if os.path.isfile(args.suite_file):
        with open(args.suite_file, "rb") as file:
            suite = tomllib.load(file)
    elif args.preset or args.suite_file != parser.get_default("suite_file"):
        parser.error(f"no suite file {args.suite_file}")
    variants = suite.pop("variants", {})
    for name, variant in variants.items():
        if (variant.get("algorithm") not in {*ALGORITHM_SCRIPTS, *FSRL_ALGORITHMS} or
                not isinstance(variant.get("args"), list) or not all(isinstance(a, str) for a in variant["args"])):
            parser.error(f"variant {name!r} of {args.suite_file} needs algorithm = one of "
                         f"{', '.join([*ALGORITHM_SCRIPTS, *FSRL_ALGORITHMS])} and args = a list of flags")
    if args.preset:
        if args.preset not in suite:
            parser.error(f"no preset {args.preset!r} in {args.suite_file} (have: {', '.join(suite)})")
        config.update(suite[args.preset])
    config["variants"] = variants
    for name in ("algorithms", "env_ids", "seeds", "total_timesteps", "cost_limit", "num_envs", "checkpoint_every",
                 "eval_every", "eval_episodes"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    if args.extra_args is not None:
        config["extra_args"] = shlex.split(args.extra_args)
    config["algo_args"] = dict(config.get("algo_args", {}))
    for item in args.algo_args:
        algorithm, _, flags = item.partition("=")
        config["algo_args"][algorithm] = config["algo_args"].get(algorithm, []) + shlex.split(flags)
    if args.workers < 1:
        parser.error("--workers must be positive")
    return args, config


def budget(config, env_id):
    total = config["total_timesteps"]
    return int(total[env_id] if isinstance(total, dict) else total)


def make_jobs(config):
    jobs = []
    for seed in config["seeds"]:  # seed-major, so every (algorithm, task) gets its first seed early
        for env_id in config["env_ids"]:
            for algorithm in config["algorithms"]:
                base, variant_args = algorithm, []
                if algorithm in config.get("variants", {}):  # the base algorithm's cell, then the variant's flags
                    variant = config["variants"][algorithm]
                    base, variant_args = variant["algorithm"], [*config["algo_args"].get(variant["algorithm"], []),
                                                                *variant["args"]]
                command = [*script_command(base), "--exp-name", algorithm, "--env-id", env_id, "--seed", str(seed),
                           "--total-timesteps", str(budget(config, env_id)), "--num-envs", str(config["num_envs"]),
                           "--cost-limit", str(config["cost_limit"]), "--save-model",
                           "--checkpoint-every", str(config["checkpoint_every"]),
                           "--eval-every", str(config["eval_every"]), "--eval-episodes", str(config["eval_episodes"]),
                           *config["extra_args"], *variant_args, *config["algo_args"].get(algorithm, [])]
                jobs.append({"key": run_key(algorithm, env_id, seed), "algorithm": algorithm, "env_id": env_id,
                             "seed": seed, "total_timesteps": budget(config, env_id), "command": command,
                             "fsrl": base in FSRL_ALGORITHMS})
    return jobs


def fsrl_python():
    """FSRL's interpreter; its virtual environment is created on first use."""
    import throughput

    throughput.ensure_fsrl_venv()
    return throughput.FSRL_PYTHON


def read_json(path, default=None):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return default


def write_json(path, data):
    with open(path + ".tmp", "w") as file:
        json.dump(data, file, indent=1)
    os.replace(path + ".tmp", path)


def script_metrics_file(run_dir):
    """The metrics.jsonl the script writes under run_dir/runs/<run_name>/ (the newest one)."""
    candidates = []
    runs = os.path.join(run_dir, "runs")
    if os.path.isdir(runs):
        for name in os.listdir(runs):
            path = os.path.join(runs, name, "metrics.jsonl")
            if os.path.isfile(path):
                candidates.append(path)
    return max(candidates, key=os.path.getmtime) if candidates else None


def find_checkpoint(run_dir):
    runs = os.path.join(run_dir, "runs")
    found = []
    if os.path.isdir(runs):
        for name in os.listdir(runs):
            path = os.path.join(runs, name, "checkpoints", "checkpoint.pkl")
            if os.path.isfile(path):
                found.append(path)
    return max(found, key=os.path.getmtime) if found else None


def sync_metrics(run_dir):
    """Copy the script's metrics.jsonl to run_dir/metrics.jsonl (complete lines only)."""
    source = script_metrics_file(run_dir)
    if source is None:
        return
    with open(source) as file:
        text = file.read()
    text = text[: text.rfind("\n") + 1]
    target = os.path.join(run_dir, "metrics.jsonl")
    with open(target + ".tmp", "w") as file:
        file.write(text)
    os.replace(target + ".tmp", target)


def read_metrics_records(path):
    """The JSON records of a metrics.jsonl, in file order, skipping a line cut off by a kill."""
    with open(path) as file:
        for line in file:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def truncate_metrics(path, last_step):
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    kept = [json.dumps(record) + "\n" for record in read_metrics_records(path)
            if record.get("global_step", 0) <= last_step]
    with open(path + ".tmp", "w") as file:
        file.writelines(kept)
    os.replace(path + ".tmp", path)


def checkpoint_step(path):
    try:
        with open(path, "rb") as file:
            return int(pickle.load(file)["global_step"])
    except Exception as error:  # noqa: BLE001 - an unreadable checkpoint means a fresh start
        print(f"[suite] cannot read {path} ({error}); starting the run afresh", flush=True)
        return None


class Runner:
    def __init__(self, args, config):
        self.args, self.config = args, config
        self.runs_dir = os.path.join(args.results_dir, "runs")
        self.running = {}  # key -> (job, Popen, lock file, start time, log file)
        self.failures = {}
        self.stopping = False

    def status(self, job):
        run_dir = os.path.join(self.runs_dir, job["key"])
        if os.path.isfile(os.path.join(run_dir, "DONE")):
            return "done"
        if not os.path.isfile(job["command"][0]):
            return "missing-script"
        return "pending"

    def start(self, job):
        run_dir = os.path.join(self.runs_dir, job["key"])
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            print(f"[suite] {job['key']}: held by another runner or a still-running process; skipped", flush=True)
            return False
        info = read_json(os.path.join(run_dir, "run.json"), {"sessions": []})
        command = [fsrl_python() if job["fsrl"] else self.args.python, *job["command"]]
        checkpoint = find_checkpoint(run_dir)
        step = checkpoint_step(checkpoint) if checkpoint else None
        if step is None:
            # Nothing to resume: clear what an earlier, interrupted attempt left behind.
            shutil.rmtree(os.path.join(run_dir, "runs"), ignore_errors=True)
            for name in ("metrics.jsonl",):
                if os.path.exists(os.path.join(run_dir, name)):
                    os.remove(os.path.join(run_dir, name))
            info = {"sessions": []}
        else:
            metrics = script_metrics_file(run_dir)
            if metrics:
                truncate_metrics(metrics, step)
                sync_metrics(run_dir)
            command += ["--resume", os.path.abspath(checkpoint)]
        info.update({k: job[k] for k in ("algorithm", "env_id", "seed", "total_timesteps")})
        info.update({"command": shlex.join(["python", os.path.relpath(job["command"][0], REPO_ROOT),
                                            *job["command"][1:]]), "status": "running"})
        info["sessions"].append({"started": time.time(), "resumed_from_step": step, "seconds": None, "returncode": None})
        write_json(os.path.join(run_dir, "run.json"), info)
        log = open(os.path.join(run_dir, "stdout.log"), "a")
        log.write(f"\n=== {time.ctime()}: {shlex.join(command)}\n")
        log.flush()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
                   WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        # Own session: a Ctrl-C on the runner reaches the runs only through stop(), which asks each to checkpoint.
        process = subprocess.Popen(command, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, pass_fds=(lock.fileno(),))
        print(f"[suite] started {job['key']} (pid {process.pid})"
              + (f", resuming from step {step}" if step is not None else ""), flush=True)
        self.running[job["key"]] = (job, process, lock, time.time(), log)
        return True

    def record_session(self, key, started, returncode=None, status=None):
        """The wall-clock of the run's current session so far (and, when it ended, its return code and the run's
        status) and the total over sessions into run.json."""
        path = os.path.join(self.runs_dir, key, "run.json")
        info = read_json(path, {"sessions": [{}]})
        info["sessions"][-1].update({"seconds": time.time() - started, "returncode": returncode})
        info["wall_seconds"] = sum(s.get("seconds") or 0 for s in info["sessions"])
        if status is not None:
            info["status"] = status
        write_json(path, info)
        return info

    def finish(self, key, returncode):
        job, process, lock, started, log = self.running.pop(key)
        run_dir = os.path.join(self.runs_dir, key)
        sync_metrics(run_dir)
        info = self.record_session(key, started, returncode,
                                   "done" if returncode == 0 else ("stopped" if self.stopping else "failed"))
        if returncode == 0:
            with open(os.path.join(run_dir, "DONE"), "w") as file:
                file.write(f"{time.ctime()}\n")
        log.close()
        lock.close()
        print(f"[suite] {key}: {info['status']} (exit {returncode}, {info['sessions'][-1]['seconds'] / 60:.1f} min)",
              flush=True)
        if returncode != 0 and not self.stopping:
            self.failures[key] = self.failures.get(key, 0) + 1
            with open(os.path.join(run_dir, "stdout.log")) as file:
                tail = file.read()[-1500:]
            print(f"[suite] {key} failed; last output:\n{tail}", flush=True)

    def stop(self, signum, frame):
        if self.stopping:
            return
        self.stopping = True
        print(f"[suite] signal {signum}: asking {len(self.running)} run(s) to checkpoint and exit", flush=True)
        self.stop_time = time.time()
        for _, process, *_ in self.running.values():
            try:  # what a Ctrl-C in a terminal does: the script checkpoints and its env workers stop
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def loop(self, jobs):
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        last_sync = time.time()
        while True:
            for key, (job, process, *_rest) in list(self.running.items()):
                if process.poll() is not None:
                    self.finish(key, process.returncode)
            if time.time() - last_sync > HEARTBEAT_SECONDS:
                for key, (job, process, lock, started, log) in self.running.items():
                    sync_metrics(os.path.join(self.runs_dir, key))
                    self.record_session(key, started)  # a runner killed outright leaves this much on record
                last_sync = time.time()
            if self.stopping:
                if not self.running:
                    return 1
                if time.time() - self.stop_time > STOP_GRACE_SECONDS:
                    for _, process, *_ in self.running.values():
                        try:
                            os.killpg(process.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                time.sleep(0.5)
                continue
            states = {job["key"]: self.status(job) for job in jobs}
            runnable = [job for job in jobs if states[job["key"]] == "pending" and job["key"] not in self.running
                        and self.failures.get(job["key"], 0) <= self.args.retry_failed
                        and job["key"] not in self.skipped]
            while runnable and len(self.running) < self.args.workers:
                job = runnable.pop(0)
                if not self.start(job):
                    self.skipped.add(job["key"])
            if not self.running and not runnable:
                missing = [key for key, state in states.items() if state == "missing-script"]
                if missing and self.args.wait_for_scripts:
                    time.sleep(30)
                    continue
                return 0 if all(state == "done" for state in states.values()) else 1
            time.sleep(0.5)

    def run(self, jobs):
        self.skipped = set()
        code = self.loop(jobs)
        summary = {}
        for job in jobs:
            summary.setdefault(self.status(job), []).append(job["key"])
        for key in self.failures:
            summary.setdefault("failed", []).append(key)
        for state, keys in summary.items():
            print(f"[suite] {state}: {len(keys)} {' '.join(keys) if state != 'done' else ''}", flush=True)
        return code


def main(argv=None):
    args, config = parse_args(argv)
    jobs = make_jobs(config)
    os.makedirs(os.path.join(args.results_dir, "runs"), exist_ok=True)
    write_json(os.path.join(args.results_dir, "suite.json"), {"preset": args.preset, **config})
    runner = Runner(args, config)
    if args.dry_run:
        for job in jobs:
            print(f"{job['key']:55s} [{runner.status(job)}] {shlex.join(job['command'])}")
        return 0
    missing = sorted({job["command"][0] for job in jobs if not os.path.isfile(job["command"][0])})
    for path in missing:
        print(f"[suite] {os.path.relpath(path, REPO_ROOT)} does not exist yet; its runs "
              + ("wait for it" if args.wait_for_scripts else "are skipped"), flush=True)
    print(f"[suite] {len(jobs)} runs, {args.workers} at a time, results in {args.results_dir}", flush=True)
    return runner.run(jobs)


if __name__ == "__main__":
    sys.exit(main())
