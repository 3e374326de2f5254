"""Measure FSRL (fast-safe-rl 0.1.0, PyTorch) for benchmarks/throughput.py. Runs in benchmarks/.fsrl-venv.

It imports the installed `fsrl` and `tianshou` packages; no FSRL code is copied here. The training
loop below is the loop of FSRL's own OffpolicyTrainer / OnpolicyTrainer (collect whole episodes,
then updates), without its logging and testing, so that only collection and learning are timed.

    python fsrl_driver.py env --num-envs 2 --episodes 2
    python fsrl_driver.py train --algo cvpo --num-envs 2 --steps 12000 --warmup-steps 2000
    python fsrl_driver.py learner --ks 16 32 64 128
Each prints one JSON line (the last line of its output).

    python fsrl_driver.py run --algo cvpo --env-id SafetyCarRun-v0 --seed 1 --total-timesteps 300000 --save-model
trains FSRL's CVPO as one run of benchmarks/run_suite.py (its algorithm `fsrl_cvpo`): the same flags as our
scripts, runs/<run_name>/metrics.jsonl in our metric names, checkpoints it resumes from (--resume), a checkpoint
on Ctrl-C or SIGTERM.
"""

import argparse
import dataclasses
import io
import json
import os
import pickle
import signal
import sys
import time
import warnings

import numpy as np


def import_safety_gymnasium():
    """safety-gymnasium 1.0.0 on Python >= 3.11: array defaults in its dataclasses become default_factory.

    The same import-time workaround as cvpo_jax.py's import_safety_gymnasium (upstream fixed it after 1.0.0).
    It must run before fsrl or anything else imports safety_gymnasium.
    """
    original_dataclass = dataclasses.dataclass

    def dataclass_with_array_defaults(cls=None, /, **kwargs):
        def wrap(cls):
            for name, value in list(vars(cls).items()):
                if isinstance(value, np.ndarray):
                    setattr(cls, name, dataclasses.field(default_factory=value.copy))
            return original_dataclass(cls, **kwargs)

        return wrap if cls is None else wrap(cls)

    dataclasses.dataclass = dataclass_with_array_defaults
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import safety_gymnasium
    finally:
        dataclasses.dataclass = original_dataclass
    return safety_gymnasium


safety_gymnasium = import_safety_gymnasium()
import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from tianshou.data import Batch, VectorReplayBuffer  # noqa: E402
from tianshou.env import DummyVectorEnv, ShmemVectorEnv  # noqa: E402

from fsrl.agent import CVPOAgent, PPOLagAgent, SACLagAgent  # noqa: E402
from fsrl.data import FastCollector  # noqa: E402


def make_envs(task, num_envs, seed):
    envs = ShmemVectorEnv([lambda: gym.make(task) for _ in range(num_envs)])
    envs.seed([seed + i for i in range(num_envs)])
    return envs


def make_agent(algo, env, args):
    common = dict(cost_limit=args.cost_limit, device="cpu", thread=args.threads, seed=args.seed,
                  hidden_sizes=tuple(args.hidden_sizes))
    if algo == "cvpo":  # FSRL's defaults, with our gamma and n_step
        return CVPOAgent(env, **common, gamma=args.gamma, n_step=args.n_step, sample_act_num=args.num_sampled_actions)
    if algo == "sacl":
        return SACLagAgent(env, **common, gamma=args.gamma, n_step=3)
    if algo == "ppol":
        return PPOLagAgent(env, **common, gamma=0.99)
    raise ValueError(algo)


def command_env(args):
    envs = make_envs(args.task, args.num_envs, args.seed)
    low, high = envs.action_space[0].low, envs.action_space[0].high
    rng = np.random.default_rng(args.seed)
    envs.reset()
    # warm-up: the first episode of each env, then whole episodes (resets included) are timed
    steps, episodes, start = 0, 0, None
    while episodes < args.episodes * args.num_envs + args.num_envs:
        if episodes >= args.num_envs and start is None:
            start, steps = time.perf_counter(), 0
        actions = rng.uniform(low, high, (args.num_envs, low.shape[0]))
        _, _, terminated, truncated, _ = envs.step(actions)
        steps += args.num_envs
        done = np.flatnonzero(terminated | truncated)
        if len(done):
            envs.reset(done)
            episodes += len(done)
    elapsed = time.perf_counter() - start
    envs.close()
    return {"vector_env": "tianshou ShmemVectorEnv", "num_envs": args.num_envs, "steps": steps,
            "seconds": elapsed, "steps_per_second": steps / elapsed}


def command_train(args):
    task_env = gym.make(args.task)
    agent = make_agent(args.algo, task_env, args)
    policy = agent.policy
    policy.train()
    envs = make_envs(args.task, args.num_envs, args.seed)
    on_policy = args.algo == "ppol"
    buffer = VectorReplayBuffer(args.buffer_size, args.num_envs)
    collector = FastCollector(policy, envs, buffer, exploration_noise=True)
    episodes_per_collect = args.ppo_episodes_per_collect if on_policy else args.num_envs

    def one_iteration():
        stats = collector.collect(n_episode=episodes_per_collect)
        learn_start = time.perf_counter()
        if on_policy:  # OnpolicyTrainer.policy_update_fn
            policy.pre_update_fn(stats_train=stats, batch_size=args.batch_size, buffer=buffer)
            policy.update(0, buffer, batch_size=args.batch_size, repeat=args.ppo_repeat)
            policy.post_update_fn(stats_train=stats)
            collector.reset_buffer(keep_statistics=True)
            updates = args.ppo_repeat
        else:  # OffpolicyTrainer.policy_update_fn
            policy.pre_update_fn(stats_train=stats, batch_size=args.batch_size, buffer=buffer,
                                 update_per_step=args.update_per_step)
            updates = round(args.update_per_step * stats["n/st"])
            for _ in range(updates):
                policy.update(args.batch_size, buffer)
            policy.post_update_fn(stats_train=stats)
        return int(stats["n/st"]), updates, stats, time.perf_counter() - learn_start

    warm = 0
    while warm < args.warmup_steps:
        warm += one_iteration()[0]
    steps, updates, learn_seconds, returns, costs = 0, 0, 0.0, [], []
    start = time.perf_counter()
    while steps < args.steps:
        n, u, stats, seconds = one_iteration()
        steps, updates, learn_seconds = steps + n, updates + u, learn_seconds + seconds
        returns.append(float(stats["rew"]))
        costs.append(float(stats["cost"]))
    elapsed = time.perf_counter() - start
    envs.close()
    return {"algo": args.algo, "num_envs": args.num_envs, "warmup_steps": warm, "steps": steps,
            "updates": updates, "seconds": elapsed, "steps_per_second": steps / elapsed,
            "learner_seconds_per_step": learn_seconds / steps,
            "episodic_return": float(np.mean(returns)), "episodic_cost": float(np.mean(costs))}


def command_learner(args):
    """Milliseconds per CVPO policy.learn(batch) (critics, E-step, M-step) on a filled buffer."""
    task_env = gym.make(args.task)
    obs_dim, action_dim = task_env.observation_space.shape[0], task_env.action_space.shape[0]
    rng = np.random.default_rng(args.seed)
    size = 20_000
    buffer = VectorReplayBuffer(size, 1)
    for i in range(size):
        buffer.add(Batch(obs=rng.standard_normal((1, obs_dim)).astype(np.float32),
                         act=rng.uniform(-1, 1, (1, action_dim)).astype(np.float32),
                         rew=rng.standard_normal(1).astype(np.float32),
                         terminated=np.array([i % 1000 == 999]), truncated=np.array([False]),
                         obs_next=rng.standard_normal((1, obs_dim)).astype(np.float32),
                         info=Batch(cost=rng.random(1).astype(np.float32))))
    results = {}
    for k in args.ks:
        args.num_sampled_actions = k
        policy = make_agent("cvpo", task_env, args).policy
        policy.train()
        policy.pre_update_fn()
        # policy.update = buffer.sample + process_fn (n-step targets) + learn; time learn on prepared batches
        batches = []
        for _ in range(args.updates + args.warmup_updates):
            batch, indices = buffer.sample(args.batch_size)
            batches.append(policy.process_fn(batch, buffer, indices))
        for batch in batches[: args.warmup_updates]:
            policy.learn(batch)
        start = time.perf_counter()
        for batch in batches[args.warmup_updates:]:
            policy.learn(batch)
        learn_ms = (time.perf_counter() - start) / args.updates * 1000
        start = time.perf_counter()
        for _ in range(args.updates):
            policy.update(args.batch_size, buffer)
        update_ms = (time.perf_counter() - start) / args.updates * 1000
        results[str(k)] = {"learn_ms": learn_ms, "update_ms": update_ms}
    return {"batch_size": args.batch_size, "hidden_sizes": args.hidden_sizes, "threads": torch.get_num_threads(),
            "ms_per_update": results}


class EpisodeRecorder(gym.Wrapper):
    """Appends (return, cost, length) of every finished episode to a list shared by the in-process envs."""

    def __init__(self, env, finished):
        super().__init__(env)
        self.finished = finished
        self.totals = np.zeros(3)

    def reset(self, **kwargs):
        self.totals[:] = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.totals += (reward, info["cost"], 1)
        if terminated or truncated:
            self.finished.append(tuple(self.totals))
        return obs, reward, terminated, truncated, info


def policy_state(policy):
    """The policy's networks, optimizers and dual variables (the policy object itself does not pickle)."""
    state = {"modules": policy.state_dict()}
    for name, value in vars(policy).items():
        if isinstance(value, torch.optim.Optimizer):
            state[name] = value.state_dict()
        elif isinstance(value, torch.Tensor):
            state[name] = value.detach().clone()
    return state


def load_policy_state(policy, state):
    policy.load_state_dict(state["modules"])
    for name, value in state.items():
        current = getattr(policy, name, None)
        if isinstance(current, torch.optim.Optimizer):
            current.load_state_dict(value)
        elif isinstance(current, torch.Tensor):
            with torch.no_grad():
                current.copy_(value)  # in place: the optimizers hold these tensors


def command_run(args):
    """FSRL's off-policy loop (collect whole episodes, then update_per_step x steps updates), logged per collect."""
    if args.algo != "cvpo":
        sys.exit("error: the run command trains FSRL's CVPO only")
    if args.env_id not in gym.envs.registry:
        import bullet_safety_gym  # noqa: F401  (registers the Bullet-Safety-Gym ids)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    checkpoint = None
    if args.resume:
        with open(args.resume, "rb") as file:
            checkpoint = pickle.load(file)
        run_name = checkpoint["run_name"]
    run_dir = os.path.join("runs", run_name)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    np.random.seed(args.seed)  # Bullet-Safety-Gym draws its start states from numpy's global generator
    agent = make_agent("cvpo", gym.make(args.env_id), args)
    policy = agent.policy
    finished = []
    train_envs = DummyVectorEnv([lambda: EpisodeRecorder(gym.make(args.env_id), finished)
                                 for _ in range(args.num_envs)])
    eval_finished = []
    eval_envs = DummyVectorEnv([lambda: EpisodeRecorder(gym.make(args.env_id), eval_finished)])
    train_envs.seed([args.seed + i for i in range(args.num_envs)])
    eval_envs.seed(args.seed + 10_000)
    buffer = VectorReplayBuffer(args.buffer_size, args.num_envs)
    global_step = 0
    if checkpoint is not None:
        payload = torch.load(io.BytesIO(checkpoint["payload"]), weights_only=False)
        load_policy_state(policy, payload["policy"])
        buffer, global_step = payload["buffer"], checkpoint["global_step"]
        np.random.set_state(payload["numpy_random_state"])
        torch.set_rng_state(payload["torch_random_state"])
    collector = FastCollector(policy, train_envs, buffer, exploration_noise=True)
    eval_collector = FastCollector(policy, eval_envs)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    checkpoint_path = os.path.join(run_dir, "checkpoints", "checkpoint.pkl")

    def log(record):
        with open(metrics_path, "a") as file:
            file.write(json.dumps({"global_step": int(global_step), **{k: float(v) for k, v in record.items()}}) + "\n")

    def save():
        payload = io.BytesIO()  # torch objects inside bytes, so that run_suite reads global_step without torch
        torch.save({"policy": policy_state(policy), "buffer": buffer, "numpy_random_state": np.random.get_state(),
                    "torch_random_state": torch.get_rng_state()}, payload)
        with open(checkpoint_path + ".tmp", "wb") as file:
            pickle.dump({"global_step": global_step, "run_name": run_name, "args": vars(args),
                         "payload": payload.getvalue()}, file)
        os.replace(checkpoint_path + ".tmp", checkpoint_path)
        return checkpoint_path

    def evaluate():
        policy.eval()
        eval_finished.clear()
        eval_collector.reset()
        eval_collector.collect(n_episode=args.eval_episodes)
        policy.train()
        returns, costs, _ = np.array(eval_finished[:args.eval_episodes]).T
        log({"eval/episodic_return": returns.mean(), "eval/episodic_cost": costs.mean(),
             "eval/penalized_return": returns.mean() - max(0.0, costs.mean() - args.cost_limit)})

    # Ctrl-C and SIGTERM are acted on between collects, where the policy, the buffer and the step agree.
    stop_signals = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stop_signals.append(signum))
    policy.train()
    try:
        while global_step < args.total_timesteps:
            if stop_signals:
                raise KeyboardInterrupt
            stats = collector.collect(n_episode=args.episodes_per_collect)
            previous_step, global_step = global_step, global_step + int(stats["n/st"])
            returns, costs, lengths = np.array(finished).T
            finished.clear()
            log({"charts/episodic_return": returns.mean(), "charts/episodic_cost": costs.mean(),
                 "charts/episodic_length": lengths.mean(), "charts/episodes_ended": len(costs),
                 "charts/cost_violation": np.maximum(costs - args.cost_limit, 0.0).mean(),
                 "charts/cost_limit": args.cost_limit})
            policy.pre_update_fn(stats_train=stats, batch_size=args.batch_size, buffer=buffer,
                                 update_per_step=args.update_per_step)
            for _ in range(round(args.update_per_step * stats["n/st"])):
                policy.update(args.batch_size, buffer)
            policy.post_update_fn(stats_train=stats)
            if args.eval_every and global_step // args.eval_every > previous_step // args.eval_every:
                evaluate()
            if args.save_model and global_step // args.checkpoint_every > previous_step // args.checkpoint_every:
                save()
    except KeyboardInterrupt:
        sys.exit(f"interrupted at global step {global_step}; resume with --resume {save()}")
    evaluate()
    if args.save_model:
        save()
    return {"run_name": run_name, "global_step": global_step}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["env", "train", "learner", "run"])
    parser.add_argument("--task", default="SafetyPointGoal1Gymnasium-v0")
    parser.add_argument("--algo", default="cvpo", choices=["cvpo", "ppol", "sacl"])
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=2, help="timed episodes per env (env command)")
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--warmup-steps", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-limit", type=float, default=25.0)
    parser.add_argument("--gamma", type=float, default=0.995)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--num-sampled-actions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--update-per-step", type=float, default=0.2)
    parser.add_argument("--buffer-size", type=int, default=200_000)
    parser.add_argument("--ppo-episodes-per-collect", type=int, default=4)
    parser.add_argument("--ppo-repeat", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--warmup-updates", type=int, default=5)
    parser.add_argument("--n-step", type=int, default=3)
    # run: the flags benchmarks/run_suite.py passes to every script
    parser.add_argument("--exp-name", default="fsrl_cvpo")
    parser.add_argument("--env-id", default="SafetyCarRun-v0")
    parser.add_argument("--total-timesteps", type=int, default=300_000)
    parser.add_argument("--episodes-per-collect", type=int, default=10, help="FSRL's episode_per_collect")
    parser.add_argument("--save-model", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=50_000)
    parser.add_argument("--eval-every", type=int, default=50_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--resume")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commands = {"env": command_env, "train": command_train, "learner": command_learner, "run": command_run}
    result = commands[args.command](args)
    result["torch"] = torch.__version__
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
