"""Measure FSRL (fast-safe-rl 0.1.0, PyTorch) for benchmarks/throughput.py. Runs in benchmarks/.fsrl-venv.

It imports the installed `fsrl` and `tianshou` packages; no FSRL code is copied here. The training
loop below is the loop of FSRL's own OffpolicyTrainer / OnpolicyTrainer (collect whole episodes,
then updates), without its logging and testing, so that only collection and learning are timed.

    python fsrl_driver.py env --num-envs 2 --episodes 2
    python fsrl_driver.py train --algo cvpo --num-envs 2 --steps 12000 --warmup-steps 2000
    python fsrl_driver.py learner --ks 16 32 64 128
Each prints one JSON line (the last line of its output).
"""

import argparse
import dataclasses
import json
import os
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
from tianshou.env import ShmemVectorEnv  # noqa: E402

from fsrl.agent import CVPOAgent, PPOLagAgent, SACLagAgent  # noqa: E402
from fsrl.data import FastCollector  # noqa: E402


def make_envs(task, num_envs, seed):
    envs = ShmemVectorEnv([lambda: gym.make(task) for _ in range(num_envs)])
    envs.seed([seed + i for i in range(num_envs)])
    return envs


def make_agent(algo, env, args):
    common = dict(cost_limit=args.cost_limit, device="cpu", thread=args.threads, seed=args.seed,
                  hidden_sizes=tuple(args.hidden_sizes))
    if algo == "cvpo":  # FSRL's MuJoCo defaults, with our gamma and n_step
        return CVPOAgent(env, **common, gamma=args.gamma, n_step=3, sample_act_num=args.num_sampled_actions)
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["env", "train", "learner"])
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"env": command_env, "train": command_train, "learner": command_learner}[args.command](args)
    result["torch"] = torch.__version__
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
