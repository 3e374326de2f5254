"""Throughput of our JAX scripts against FSRL (fast-safe-rl 0.1.0, the CVPO authors' PyTorch library).

    .venv/bin/python benchmarks/throughput.py                 # full run; writes benchmarks/results/throughput.md
    .venv/bin/python benchmarks/throughput.py --ours-only     # skip FSRL (no venv is created)
    .venv/bin/python benchmarks/throughput.py --smoke --output /tmp/t.md   # seconds-long check (tests)

Measures, on one task and machine, with the same env count and matched hyperparameters:
1. random-action env steps/s of the vector env (whole episodes, resets included): the ceiling;
2. training env steps/s of FSRL's CVPO, PPO-Lag, SAC-Lag and of our scripts, over a fixed number of env
   steps after a warm-up (updates included; for ours after learning_starts and the JIT compile);
3. learner only: milliseconds per CVPO update (critics, E-step, M-step) at batch 256, hidden (128, 128),
   K = 16, 32, 64, 128 sampled actions, for ours (train_round: many updates in one jitted scan, divided)
   and for FSRL (policy.learn on a filled tianshou buffer).
FSRL runs in its own virtual environment, benchmarks/.fsrl-venv, created on first use (see FSRL_RECIPE);
benchmarks/fsrl_driver.py is the FSRL-side script (it imports fsrl; nothing of FSRL is copied).
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
FSRL_VENV = os.environ.get("FSRL_VENV", os.path.join(BENCHMARKS_DIR, ".fsrl-venv"))  # env var: another location
FSRL_PYTHON = os.path.join(FSRL_VENV, "bin", "python")
TORCH_WHEEL = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
# The project's pinned requirements.txt minus the JAX / wandb / test-only packages: the safety-gymnasium stack.
NOT_FOR_FSRL = ("jax", "jaxlib", "flax", "optax", "chex", "orbax", "tensorstore", "ml-dtypes", "etils", "treescope",
                "wandb", "opentelemetry", "pytest", "iniconfig", "pluggy", "tyro", "msgpack", "cwevals")
# The recipe that worked (November 2026, Python 3.11): torch from the local CPU wheel (no CUDA packages),
# fsrl and tianshou without their pins (wandb~=0.14 / protobuf~=3.19 clash with Python 3.11 and the stack),
# the project's safety-gymnasium stack with --no-deps, then fsrl's and tianshou's remaining imports,
# constrained to numpy 1.26.4 (numpy 2 breaks safety-gymnasium's Car agents).
FSRL_RECIPE = [
    ["{python}", "-m", "venv", FSRL_VENV],
    ["{pip}", "install", "{torch}"],
    ["{pip}", "install", "--no-deps", "fast-safe-rl==0.1.0", "tianshou==0.5.0"],
    ["{pip}", "install", "--no-deps", "-r", "{requirements}"],
    ["{pip}", "install", "-c", "{constraints}", "numba", "h5py", "tensorboard", "pyrallis==0.3.1", "prettytable",
     "wandb"],
]
TASK, FSRL_TASK = "SafetyPointGoal1-v0", "SafetyPointGoal1Gymnasium-v0"
OUR_SCRIPTS = {"CVPO": "cvpo_jax.py", "PPO-Lag": "ppo_lagrangian_jax.py", "SAC-Lag": "sac_lagrangian_jax.py"}
FSRL_ALGOS = {"CVPO": "cvpo", "PPO-Lag": "ppol", "SAC-Lag": "sacl"}
# Our flags that match the FSRL side (fsrl_driver.py): K=16 for CVPO; for PPO-Lag FSRL's update per rollout
# (4 passes, batch 256) instead of our OmniSafe-like default (up to 40 passes, minibatch 64), and its rollout length.
# CVPO: rounds of 2 episodes, as the FSRL driver collects num_envs episodes per round (FSRL's own config uses 10).
MATCHED_FLAGS = {"CVPO": ["--num-sampled-actions", "16", "--no-double-critic", "--update-interval", "2000"], "PPO-Lag": ["--update-epochs", "4", "--minibatch-size", "256"]}
PPO_EPISODES_PER_COLLECT, EPISODE_LENGTH, UPDATES_PER_STEP = 4, 1000, 0.2
OVERLAPPING = ("CVPO", "SAC-Lag")  # the scripts whose rounds can run while the envs step (--overlap-learning)


def log(message):
    print(f"[throughput] {message}", flush=True)


def ensure_fsrl_venv():
    if os.path.exists(FSRL_PYTHON):
        check = subprocess.run([FSRL_PYTHON, "-c", "import fsrl, tianshou, torch"], capture_output=True)
        if check.returncode == 0:
            return
    log(f"creating {FSRL_VENV} (a few minutes)")
    python = "python3.11" if subprocess.run(["which", "python3.11"], capture_output=True).returncode == 0 else "python3"
    torch = TORCH_WHEEL if os.path.exists(TORCH_WHEEL) else "torch==2.13.0"
    with tempfile.TemporaryDirectory() as tmp:
        requirements, constraints = os.path.join(tmp, "requirements.txt"), os.path.join(tmp, "constraints.txt")
        with open(os.path.join(REPO_ROOT, "requirements.txt")) as source, open(requirements, "w") as target:
            for line in source:
                name = line.split("==")[0].strip().lower()
                if line.strip() and not line.startswith("#") and not name.startswith(NOT_FOR_FSRL):
                    target.write(line)
        with open(constraints, "w") as file:
            file.write("numpy==1.26.4\n")
        extra_index = [] if torch == TORCH_WHEEL else ["--index-url", "https://download.pytorch.org/whl/cpu"]
        for step in FSRL_RECIPE:
            command = [part.format(python=python, pip=os.path.join(FSRL_VENV, "bin", "pip"), torch=torch,
                                   requirements=requirements, constraints=constraints) for part in step]
            if torch in command:
                command += extra_index
            log(shlex.join(command))
            subprocess.run(command, check=True)


def run_fsrl(*arguments, threads):
    command = [FSRL_PYTHON, os.path.join(BENCHMARKS_DIR, "fsrl_driver.py"), *arguments, "--threads", str(threads)]
    log(shlex.join(command[1:]))
    result = subprocess.run(command, capture_output=True, text=True, cwd=BENCHMARKS_DIR)
    if result.returncode != 0:
        raise RuntimeError(f"FSRL driver failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def our_env_throughput(task, num_envs, episodes):
    """Random actions through the same vector env our scripts use (gymnasium AsyncVectorEnv), whole episodes."""
    import numpy as np

    sys.path.insert(0, REPO_ROOT)
    import cvpo_jax
    import gymnasium as gym

    envs_class = gym.vector.AsyncVectorEnv if num_envs > 1 else gym.vector.SyncVectorEnv
    envs = envs_class([cvpo_jax.make_env(task, 1 + i) for i in range(num_envs)])
    rng = np.random.default_rng(1)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    envs.reset(seed=1)
    steps, episodes_done, start = 0, 0, None
    while episodes_done < (episodes + 1) * num_envs:  # the first episode of each env is the warm-up
        if episodes_done >= num_envs and start is None:
            start, steps = time.perf_counter(), 0
        _, _, terminated, truncated, _ = envs.step(rng.uniform(low, high, (num_envs, low.shape[0])))
        steps += num_envs
        episodes_done += int((terminated | truncated).sum())
    elapsed = time.perf_counter() - start
    envs.close()
    return {"vector_env": f"gymnasium {envs_class.__name__}", "num_envs": num_envs, "steps": steps,
            "seconds": elapsed, "steps_per_second": steps / elapsed}


def script_flags(script):
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO_ROOT).stdout
    return help_text


def our_training_throughput(name, script, task, num_envs, warmup_steps, steps, learning_starts, extra):
    """Run the script for learning_starts + warm-up + steps env steps; the rate between the first
    update round after the warm-up and the last one, from its logged charts/SPS (env steps / seconds
    since the start): t(s) = s / SPS(s)."""
    flags = script_flags(script)
    command = [sys.executable, script, "--env-id", task, "--seed", "1", "--num-envs", str(num_envs),
               "--eval-every", "0", "--eval-episodes", "1", "--exp-name", f"throughput_{name}"]
    start_at = warmup_steps
    if "--learning-starts" in flags:
        command += ["--learning-starts", str(learning_starts)]
        start_at += learning_starts
    total = start_at + steps
    command += ["--total-timesteps", str(total), *extra]
    with tempfile.TemporaryDirectory() as tmp:
        log(shlex.join(command[1:]))
        began = time.perf_counter()
        result = subprocess.run(command, cwd=tmp, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=REPO_ROOT, WANDB_MODE="disabled"))
        wall = time.perf_counter() - began
        if result.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
        records = []
        for root, _, files in os.walk(tmp):
            if "metrics.jsonl" in files:
                with open(os.path.join(root, "metrics.jsonl")) as file:
                    records = [json.loads(line) for line in file if line.strip()]
    sps = [(r["global_step"], r["charts/SPS"]) for r in records if "charts/SPS" in r and r["charts/SPS"] > 0]
    timed = [(s, v) for s, v in sps if s >= start_at]
    out = {"name": name, "num_envs": num_envs, "command": shlex.join(["python", os.path.basename(script), *command[2:]]),
           "wall_seconds": wall}
    iterations = [r["estep/solver_iterations"] for r in records if "estep/solver_iterations" in r]
    if iterations:
        out["estep_solver_iterations"] = sum(iterations) / len(iterations)
    if len(timed) >= 2:
        (s0, v0), (s1, v1) = timed[0], timed[-1]
        seconds = s1 / v1 - s0 / v0
        out.update({"steps": s1 - s0, "seconds": seconds, "steps_per_second": (s1 - s0) / seconds,
                    "from_step": s0, "to_step": s1})
    else:  # too few logging points: the whole run's average, warm-up, compile and final evaluation included
        out.update({"steps": total, "seconds": wall, "steps_per_second": total / wall, "from_step": 0,
                    "to_step": total, "note": "whole-run average"})
    return out


def our_learner_ms(ks, batch_size, updates, solver):
    """Milliseconds per update of cvpo_jax's jitted train_round (critics, E-step, M-step), after compiling; with the
    newton solver also where the update's time goes: each part scanned alone over the same batches."""
    sys.path.insert(0, REPO_ROOT)
    import cvpo_jax
    import jax
    import numpy as np

    obs_dim, action_dim = 60, 2  # SafetyPointGoal1-v0
    rng = np.random.default_rng(0)
    results = {}
    for k in ks:
        args = cvpo_jax.Args(num_sampled_actions=k, batch_size=batch_size, hidden_sizes=(128, 128),
                             estep_solver=solver, double_critic=False, estep_dual_max=1e5 if solver == "newton" else 20.0)
        low, high = -np.ones(action_dim, np.float32), np.ones(action_dim, np.float32)
        actor = cvpo_jax.Actor(action_dim, tuple(args.hidden_sizes), *cvpo_jax.mean_bounds(low, high, args.mean_bound))
        critic = cvpo_jax.CriticEnsemble(tuple(args.hidden_sizes), 2 if args.double_critic else 1)
        eps_cost = cvpo_jax.cost_threshold(args.cost_limit, args.gamma, 1000)
        cvpo = cvpo_jax.make_train_round(args, actor, critic, low, high, eps_cost)
        state = cvpo.init_state(jax.random.PRNGKey(0), obs_dim, action_dim)
        batches = random_batches(rng, (updates, batch_size), obs_dim, action_dim)
        batches["policy_obs"] = rng.standard_normal((updates, batch_size, obs_dim)).astype(np.float32)
        state, metrics = jax.block_until_ready(cvpo.train_round(state, batches, jax.random.PRNGKey(1)))
        ms = lambda call: best_seconds(call) / updates * 1000
        results[str(k)] = {"ms": ms(lambda seed: cvpo.train_round(state, batches, jax.random.PRNGKey(seed))),
                           "solver_iterations": float(metrics.get("estep/solver_iterations", 1))}
        if solver != "newton":
            continue

        def scanned(part):
            @jax.jit
            def run(state, key):
                body = lambda state, inputs: (part(state, *inputs), None)
                return jax.lax.scan(body, state, (batches, jax.random.split(key, updates)))[0]
            return lambda seed: run(state, jax.random.PRNGKey(seed))

        def q_values_only(state, batch, key):
            sampled = jax.random.normal(key, (batch_size, k, action_dim))
            q_values = critic.apply(state.critic.params, batch["policy_obs"][:, None], sampled)
            return state.replace(duals=state.duals + q_values.mean())  # keeps the scan from dropping the work

        def mstep_only(state, batch, key):  # on K actions around pi_old's mean, weighted uniformly
            sampled = jax.random.normal(key, (batch_size, k, action_dim))
            return cvpo.mstep(state, batch["policy_obs"], sampled, np.full((batch_size, k), 1 / k, np.float32))[0]

        results[str(k)]["parts"] = {
            "critics": ms(scanned(lambda state, batch, key: cvpo.update_critics(state, batch, key)[0])),
            "E-step Q values": ms(scanned(q_values_only)),
            "E-step": ms(scanned(lambda state, batch, key: cvpo.estep(state, batch["policy_obs"], key)[0])),
            "M-step": ms(scanned(mstep_only)),
        }
    return results


def random_batches(rng, shape, obs_dim, action_dim):
    import numpy as np

    return {"obs": rng.standard_normal((*shape, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (*shape, action_dim)).astype(np.float32),
            "reward_return": rng.standard_normal(shape).astype(np.float32) * 0.1,
            "cost_return": (rng.random(shape) < 0.05).astype(np.float32),
            "bootstrap_obs": rng.standard_normal((*shape, obs_dim)).astype(np.float32),
            "bootstrap_discount": np.full(shape, 0.995**3, np.float32)}


def best_seconds(call, repeats=5):
    """Best of `repeats` timed calls of a jitted function, after one compile call."""
    import jax

    jax.block_until_ready(call(0))
    timings = []
    for repeat in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call(1 + repeat))
        timings.append(time.perf_counter() - start)
    return min(timings)


def our_learner_seconds_per_env_step(name, num_envs):
    """The learner's compute per env step, alone and single-threaded as in the timed runs: SAC-Lag's train_round
    (0.2 updates per env step), PPO-Lag's train_iteration on one rollout of the timed runs' size (4 passes, batch
    256). CVPO's comes from the learner table (K = 16, newton solver)."""
    sys.path.insert(0, REPO_ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    obs_dim, action_dim = 60, 2  # SafetyPointGoal1-v0
    rng = np.random.default_rng(0)
    if name == "SAC-Lag":
        import sac_lagrangian_jax as sac

        args = sac.Args(hidden_sizes=(128, 128))
        actor, critic = sac.Actor(action_dim, args.hidden_sizes), sac.CriticEnsemble(args.hidden_sizes)
        init_state, _, train_round = sac.make_train_functions(args, actor, critic, jnp.ones(action_dim),
                                                              jnp.zeros(action_dim), action_dim)
        state, updates = init_state(jax.random.PRNGKey(0), obs_dim), 200
        batches = random_batches(rng, (updates, args.batch_size), obs_dim, action_dim)
        seconds = best_seconds(lambda seed: train_round(state, batches, jax.random.PRNGKey(seed)))
        return seconds / updates * args.updates_per_step
    import ppo_lagrangian_jax as ppo

    rollout_per_env = PPO_EPISODES_PER_COLLECT * EPISODE_LENGTH // num_envs
    args = ppo.Args(num_envs=num_envs, num_steps=rollout_per_env, update_epochs=4,
                    minibatch_size=256, target_kl=1e9)  # every pass runs, as FSRL's repeat
    train_iteration, init_state = ppo.make_train_iteration(args, ppo.Actor(action_dim, args.hidden_sizes),
                                                           ppo.ValueNetwork(args.hidden_sizes))
    state, shape = init_state(jax.random.PRNGKey(0), obs_dim), (rollout_per_env, num_envs)
    rollout = {name: rng.standard_normal(shape).astype(np.float32) for name in
               ["logprobs", "values_reward", "values_cost", "rewards", "costs", "final_values_reward",
                "final_values_cost"]}
    rollout |= {"obs": rng.standard_normal((*shape, obs_dim)).astype(np.float32),
                "actions": rng.standard_normal((*shape, action_dim)).astype(np.float32),
                "terminations": np.zeros(shape, np.float32), "truncations": np.zeros(shape, np.float32),
                "last_values_reward": rng.standard_normal(num_envs).astype(np.float32),
                "last_values_cost": rng.standard_normal(num_envs).astype(np.float32)}
    seconds = best_seconds(lambda seed: train_iteration(state, rollout, args.actor_lr, jax.random.PRNGKey(seed)))
    return seconds / (rollout_per_env * num_envs)


def our_env_cpu_seconds_per_step(task, steps):
    """CPU seconds of one env step on its own (one in-process env, random actions, resets included)."""
    import numpy as np

    sys.path.insert(0, REPO_ROOT)
    import cvpo_jax

    env = cvpo_jax.make_env(task, 1)()
    rng = np.random.default_rng(1)
    low, high = env.action_space.low, env.action_space.high
    env.reset(seed=1)
    start = time.process_time()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(low, high))
        if terminated or truncated:
            env.reset()
    seconds = time.process_time() - start
    env.close()
    return seconds / steps


def machine_description():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import jax
    import numpy

    versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": numpy.__version__}
    try:
        import mujoco

        versions["mujoco"] = mujoco.__version__
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "platform": platform.platform(), "versions": versions,
            "load_average_at_start": os.getloadavg(), "jax_backend": jax.default_backend()}


def fmt(value, digits=0):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def write_report(path, command, machine, results):
    env, fsrl_env, train, learner = results["env"], results.get("fsrl_env"), results["train"], results["learner"]
    lines = [
        "# Throughput: our JAX scripts against FSRL",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cores']} cores, {machine['cpu']}, {machine['platform']}, JAX backend "
        f"`{machine['jax_backend']}`; load average at start {', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])}"
        f" (the machine is shared; other jobs' load lowers every figure alike, compare ratios rather than absolutes).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        + (f", FSRL side: fast-safe-rl 0.1.0, tianshou 0.5.0, torch {results['fsrl_torch']}" if results.get("fsrl_torch") else ""),
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} in {results['seconds'] / 60:.1f} min. Task `{results['task']}` "
        f"(FSRL: `{FSRL_TASK}`), {results['num_envs']} envs, hidden (128, 128), batch 256, 0.2 updates per env step "
        f"for the off-policy methods, {results['threads']} compute thread(s) per learner on both sides (torch "
        "`set_num_threads`, XLA `intra_op_parallelism_threads`).",
        "",
        "## Random-action env throughput (the ceiling)",
        "",
        "| vector env | envs | env steps | seconds | env steps/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in [env] + ([fsrl_env] if fsrl_env else []):
        lines.append(f"| {row['vector_env']} | {row['num_envs']} | {row['steps']:,} | {row['seconds']:.1f} | "
                     f"{row['steps_per_second']:,.0f} |")
    readings = [("ours", results.get("env_readings")), ("FSRL", results.get("fsrl_env_readings"))]
    lines += ["", "Each vector env was measured before and after the training runs; the table keeps the faster reading ("
              + "; ".join(f"{side}: {', '.join(f'{x:,.0f}' for x in values)}" for side, values in readings if values)
              + " env steps/s)."]
    cores, t_env = machine["cores"], results["env_cpu_seconds_per_step"]
    ours_t_learn = dict(results["ours_learner_seconds_per_step"])
    if "16" in learner.get("ours_newton", {}):
        ours_t_learn["CVPO"] = learner["ours_newton"]["16"]["ms"] / 1000 * UPDATES_PER_STEP
    lines += ["", "## Training throughput (env steps/s, updates included, after warm-up)", "",
              f"CPU-work ceiling: {cores} cores cannot step faster than {cores} / (t_env + t_learn) env steps/s, "
              f"with t_env = {t_env * 1000:.3f} ms the CPU time of one env step alone (one in-process env, random "
              "actions) and t_learn the learner's time per env step alone (ours: the jitted update on random data "
              "of the timed runs' shapes; FSRL: the time its training loop spends in the update calls). The "
              "fraction of the ceiling a run reaches is what its loop loses to waiting, copying and Python.", "",
              "| algorithm | ours | ours, --overlap-learning | FSRL | ours / FSRL | ours / env limit | "
              "t_learn ms (ours, FSRL) | ceiling (ours, FSRL) | fraction of ceiling (ours, FSRL) | "
              "timed env steps (ours, FSRL) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in OUR_SCRIPTS:
        ours, fsrl = train.get(("ours", name)), train.get(("fsrl", name))
        overlapping = train.get(("ours, overlap", name))
        our_sps = ours["steps_per_second"] if ours else None
        fsrl_sps = fsrl["steps_per_second"] if fsrl else None
        ratio = f"{our_sps / fsrl_sps:.2f}" if our_sps and fsrl_sps else "n/a"
        limit = f"{our_sps / env['steps_per_second']:.2f}" if our_sps else "n/a"
        learn = [ours_t_learn.get(name) if ours else None, fsrl.get("learner_seconds_per_step") if fsrl else None]
        ceiling = [cores / (t_env + t) if t is not None else None for t in learn]
        fraction = [sps / c if sps and c else None for sps, c in zip([our_sps, fsrl_sps], ceiling)]
        counts = f"{fmt(ours and ours['steps'])}, {fmt(fsrl and fsrl['steps'])}"
        lines.append(f"| {name} | {fmt(our_sps)} | {fmt(overlapping and overlapping['steps_per_second'])} | {fmt(fsrl_sps)} | "
                     f"{ratio} | {limit} | "
                     f"{', '.join(fmt(t and t * 1000, 3) for t in learn)} | {', '.join(fmt(c) for c in ceiling)} | "
                     f"{', '.join(fmt(f, 2) for f in fraction)} | {counts} |")
    lines += [""]
    for (side, name), row in sorted((k, v) for k, v in train.items() if isinstance(k, tuple)):
        if side.startswith("ours"):
            extra = (f"; mean E-step solver iterations {row['estep_solver_iterations']:.2f}"
                     if "estep_solver_iterations" in row else "")
            lines.append(f"- {side}, {name}: `{row['command']}`, timed from step {row['from_step']:,} to "
                         f"{row['to_step']:,}{extra}{'; ' + row['note'] if 'note' in row else ''}")
        else:
            what = "passes over rollouts" if name == "PPO-Lag" else "updates"
            lines.append(f"- FSRL, {name}: `{row['command']}`, {row['updates']:,} {what} in the timed window")
    lines.append("- A ratio to the env limit above 1 means the load of the shared machine changed between the "
                 "measurements; ours / FSRL compares runs taken one right after the other.")
    for name in train.get("skipped", []):
        lines.append(f"- {name}: skipped ({train['skipped'][name]})")
    lines += ["", "## CVPO learner only (ms per update: critics + E-step + M-step; batch 256, hidden (128, 128))", "",
              "| K sampled actions | ours, newton E-step solver (to its KKT tolerance) | ours, fsrl E-step solver (one Adam step) | "
              "FSRL policy.learn | FSRL policy.update (with n-step targets) | FSRL / ours (fsrl solver) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k in results["ks"]:
        newton = learner["ours_newton"].get(str(k))
        one_step = learner["ours_fsrl"].get(str(k))
        fsrl = (learner.get("fsrl") or {}).get(str(k))
        ratio = f"{fsrl['learn_ms'] / one_step['ms']:.1f}x" if fsrl and one_step else "n/a"
        lines.append(f"| {k} | {fmt(newton and newton['ms'], 2)} ({fmt(newton and newton['solver_iterations'], 1)} it.) | "
                     f"{fmt(one_step and one_step['ms'], 2)} | {fmt(fsrl and fsrl['learn_ms'], 2)} | "
                     f"{fmt(fsrl and fsrl['update_ms'], 2)} | {ratio} |")
    lines += ["", f"Ours: {results['learner_updates']} updates per jitted `train_round` call on random batches, best of 5 "
              "calls after a compile call, one critic per signal as FSRL; the newton solver's iteration count depends on the data (column: mean "
              "iterations in the timed call). FSRL: `policy.learn(batch)` on batches prepared by its `process_fn` "
              f"from a 20,000-transition tianshou buffer, {results['fsrl_updates']} timed calls after 5 warm-up calls, "
              f"{results['threads']} compute thread(s) per learner on both sides (`--threads`).", ""]
    profiled = [k for k in results["ks"] if "parts" in learner["ours_newton"].get(str(k), {})]
    if profiled:
        lines += ["## Where our CVPO update spends its time (newton solver)", "",
                  "Each part scanned alone over the same batches (ms per update; the M-step on K random actions "
                  "weighted uniformly), so the parts need not add up to the whole update exactly. The E-step's Q "
                  "values are the critics on B x K (state, action) pairs, whose matrix products set the floor of "
                  "the update's cost.", "",
                  "| K | whole update | critics | E-step | of which Q values | M-step |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k in profiled:
            row = learner["ours_newton"][str(k)]
            parts = row["parts"]
            lines.append(f"| {k} | {row['ms']:.2f} | {parts['critics']:.2f} | {parts['E-step']:.2f} | "
                         f"{parts['E-step Q values']:.2f} | {parts['M-step']:.2f} |")
        lines.append("")
    with open(path, "w") as file:
        file.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=TASK, help="our env id (FSRL always runs SafetyPointGoal1Gymnasium-v0)")
    parser.add_argument("--num-envs", type=int, default=2, help="envs for every training measurement (FSRL's setting)")
    parser.add_argument("--steps", type=int, default=12_000, help="timed env steps per training measurement")
    parser.add_argument("--warmup-steps", type=int, default=2_000, help="env steps before timing starts")
    parser.add_argument("--learning-starts", type=int, default=2_000, help="ours: --learning-starts for the timed runs")
    parser.add_argument("--env-episodes", type=int, default=3, help="timed random-action episodes per env")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--learner-updates", type=int, default=200, help="ours: updates per timed train_round call")
    parser.add_argument("--fsrl-updates", type=int, default=50, help="FSRL: timed policy.learn calls per K")
    parser.add_argument("--algorithms", nargs="+", default=list(OUR_SCRIPTS), choices=list(OUR_SCRIPTS))
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads per learner on both sides (torch.set_num_threads; XLA's intra-op pool). "
                             "1 by default: on a loaded 2-core machine torch with 2 threads took 1.6 s per CVPO update "
                             "instead of 47 ms (spinning threads), which would say nothing about either library")
    parser.add_argument("--ours-only", action="store_true", help="skip FSRL (no venv is created)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check: ours only, CVPO only, tiny step counts (for the test suite)")
    parser.add_argument("--output", default=os.path.join(BENCHMARKS_DIR, "results", "throughput.md"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.ours_only, args.algorithms, args.task = True, ["CVPO"], "tests.constrained_speed:ConstrainedSpeed-v0"
        args.steps, args.warmup_steps, args.learning_starts, args.env_episodes = 400, 200, 200, 1
        args.ks, args.learner_updates = [16], 10
    command = shlex.join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])])
    threads = args.threads
    if threads:  # before JAX is imported here or in the scripts we start
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={threads}").strip()
    began = time.time()
    machine = machine_description()
    results = {"task": args.task, "threads": threads, "num_envs": args.num_envs, "ks": args.ks, "learner_updates": args.learner_updates,
               "fsrl_updates": args.fsrl_updates, "train": {"skipped": {}}, "learner": {}}
    if not args.ours_only:
        ensure_fsrl_venv()

    log("random-action env throughput")
    results["env"] = our_env_throughput(args.task, args.num_envs, args.env_episodes)
    log(f"ours: {results['env']['steps_per_second']:.0f} env steps/s")
    if not args.ours_only:
        results["fsrl_env"] = run_fsrl("env", "--task", FSRL_TASK, "--num-envs", str(args.num_envs),
                                       "--episodes", str(args.env_episodes), threads=threads)
        results["fsrl_torch"] = results["fsrl_env"]["torch"]
        log(f"FSRL: {results['fsrl_env']['steps_per_second']:.0f} env steps/s")

    for name in args.algorithms:
        script = os.path.join(REPO_ROOT, OUR_SCRIPTS[name])
        if not os.path.exists(script):
            results["train"]["skipped"][f"ours, {name}"] = f"{OUR_SCRIPTS[name]} does not exist"
        else:
            extra, warmup = list(MATCHED_FLAGS.get(name, [])), args.warmup_steps
            if name == "PPO-Lag":  # FSRL's rollout: PPO_EPISODES_PER_COLLECT whole episodes, 4 passes, batch 256
                rollout_per_env = PPO_EPISODES_PER_COLLECT * EPISODE_LENGTH // args.num_envs
                extra += ["--num-steps", str(rollout_per_env)]
                warmup = rollout_per_env * args.num_envs  # the first rollout and its update (with the compile)
            if ":" in args.task:  # a toy task: cheaper in-process envs
                extra.append("--no-async-envs")
            try:
                row = our_training_throughput(name, script, args.task, args.num_envs, warmup, args.steps,
                                              args.learning_starts, extra)
                results["train"][("ours", name)] = row
                log(f"ours, {name}: {row['steps_per_second']:.0f} env steps/s")
                if name in OVERLAPPING:  # the same run with acting overlapping learning: what the overlap gains
                    row = our_training_throughput(f"{name}_overlap", script, args.task, args.num_envs, warmup,
                                                  args.steps, args.learning_starts, extra + ["--overlap-learning"])
                    results["train"][("ours, overlap", name)] = row
                    log(f"ours, {name}, --overlap-learning: {row['steps_per_second']:.0f} env steps/s")
            except RuntimeError as error:
                results["train"]["skipped"][f"ours, {name}"] = str(error).splitlines()[-1][:200]
                log(f"ours, {name} failed: {error}")
        if not args.ours_only:
            arguments = ["train", "--algo", FSRL_ALGOS[name], "--task", FSRL_TASK, "--num-envs", str(args.num_envs),
                         "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
            if name == "PPO-Lag":
                arguments += ["--ppo-episodes-per-collect", str(PPO_EPISODES_PER_COLLECT), "--ppo-repeat", "4"]
            row = run_fsrl(*arguments, threads=threads)
            row["command"] = shlex.join(["python", "benchmarks/fsrl_driver.py", *arguments])
            results["train"][("fsrl", name)] = row
            log(f"FSRL, {name}: {row['steps_per_second']:.0f} env steps/s")

    # The machine is shared and its load drifts: measure the ceiling again after the training runs and keep the
    # faster measurement of each vector env, so that "ours / env limit" is not inflated by a slow first reading.
    log("random-action env throughput, again")
    again = our_env_throughput(args.task, args.num_envs, args.env_episodes)
    results["env_readings"] = [results["env"]["steps_per_second"], again["steps_per_second"]]
    results["env"] = max(results["env"], again, key=lambda row: row["steps_per_second"])
    if not args.ours_only:
        again = run_fsrl("env", "--task", FSRL_TASK, "--num-envs", str(args.num_envs), "--episodes",
                         str(args.env_episodes), threads=threads)
        results["fsrl_env_readings"] = [results["fsrl_env"]["steps_per_second"], again["steps_per_second"]]
        results["fsrl_env"] = max(results["fsrl_env"], again, key=lambda row: row["steps_per_second"])

    log("CPU work per env step: the env alone, each learner alone")
    results["env_cpu_seconds_per_step"] = our_env_cpu_seconds_per_step(args.task, 500 if args.smoke else 5000)
    results["ours_learner_seconds_per_step"] = {name: our_learner_seconds_per_env_step(name, args.num_envs)
                                                for name in args.algorithms if name != "CVPO"}
    log("CVPO learner")
    results["learner"]["ours_newton"] = our_learner_ms(args.ks, 256, args.learner_updates, "newton")
    results["learner"]["ours_fsrl"] = our_learner_ms(args.ks, 256, args.learner_updates, "fsrl")
    if not args.ours_only:
        results["learner"]["fsrl"] = run_fsrl("learner", "--task", FSRL_TASK, "--ks", *map(str, args.ks),
                                              "--updates", str(args.fsrl_updates), threads=threads)["ms_per_update"]
    results["seconds"] = time.time() - began
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_report(args.output, command, machine, results)
    with open(os.path.splitext(args.output)[0] + ".json", "w") as file:
        json.dump({**results, "machine": machine,
                   "train": {f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in results["train"].items()}},
                  file, indent=1)
    log(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
