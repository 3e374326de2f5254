"""Tests of ppo_lagrangian_jax.py: the scanned GAE, the multiplier updates and their window, the observation
normaliser, learning under a cost limit on the toy task with the default multiplier, and SafetyPointGoal1 end to end
through a checkpoint."""

import json
import os
import pickle
import subprocess

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppo_lagrangian_jax import (Args, ObsNormalizer, add_episode_costs, compute_gae, init_lagrange, lagrange_update,
                                normalize_obs, update_obs_normalizer, window_mean_cost)
from tests.helpers import (FSRL_GAINS, PID_COST_LIMIT, PID_COSTS, REPO, TOY_ENV, fsrl_pid_multipliers, only_run_dir,
                           read_metrics, run_script, script_command)

SCRIPT = "ppo_lagrangian_jax.py"


def gae_loop(rewards, values, last_values, final_values, terminations, truncations, gamma, gae_lambda):
    """Plain GAE, one env and one step at a time."""
    num_steps, num_envs = rewards.shape
    advantages = np.zeros((num_steps, num_envs))
    for env in range(num_envs):
        advantage = 0.0
        for t in reversed(range(num_steps)):
            if terminations[t, env]:
                next_value = 0.0
            elif truncations[t, env]:
                next_value = final_values[t, env]
            elif t == num_steps - 1:
                next_value = last_values[env]
            else:
                next_value = values[t + 1, env]
            if terminations[t, env] or truncations[t, env]:
                advantage = 0.0
            advantage = rewards[t, env] + gamma * next_value - values[t, env] + gamma * gae_lambda * advantage
            advantages[t, env] = advantage
    return advantages, advantages + values


@pytest.mark.parametrize("signal", ["reward", "cost"])
def test_scanned_gae_matches_python_loop(signal):
    rng = np.random.default_rng(0 if signal == "reward" else 1)
    num_steps, num_envs = 50, 4
    if signal == "reward":
        rewards = rng.normal(size=(num_steps, num_envs))
    else:
        rewards = (rng.random((num_steps, num_envs)) < 0.3).astype(float)
    values, final_values = rng.normal(size=(2, num_steps, num_envs))
    last_values = rng.normal(size=num_envs)
    terminations = rng.random((num_steps, num_envs)) < 0.08
    truncations = rng.random((num_steps, num_envs)) < 0.08  # some steps are both: the termination wins
    inputs = [x.astype(np.float32) for x in (rewards, values, last_values, final_values, terminations, truncations)]
    advantages, targets = compute_gae(*inputs, 0.99, 0.95)
    expected_advantages, expected_targets = gae_loop(*inputs, 0.99, 0.95)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, expected_targets, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_from_final_observation_termination_does_not():
    # One env, two steps; the episode ends after step 0 and values[1] already belongs to the next episode.
    rewards, values = np.array([[1.0], [0.0]], np.float32), np.array([[0.5], [100.0]], np.float32)
    last_values, final_values = np.array([7.0], np.float32), np.array([[3.0], [0.0]], np.float32)
    ended, running = np.array([[1.0], [0.0]], np.float32), np.zeros((2, 1), np.float32)
    gamma = 0.9
    truncated, _ = compute_gae(rewards, values, last_values, final_values, running, ended, gamma, 0.95)
    terminated, _ = compute_gae(rewards, values, last_values, final_values, ended, running, gamma, 0.95)
    assert float(truncated[0, 0]) == pytest.approx(1.0 + gamma * 3.0 - 0.5)
    assert float(terminated[0, 0]) == pytest.approx(1.0 - 0.5)
    assert float(truncated[1, 0]) == float(terminated[1, 0]) == pytest.approx(gamma * 7.0 - 100.0)


def run_updates(costs, **flags):
    args = Args(**flags)
    lagrange, multipliers = init_lagrange(args), []
    for cost in costs:
        lagrange = lagrange_update(lagrange, cost, 2, args)
        multipliers.append(float(lagrange.multiplier))
    return lagrange, np.array(multipliers)


def test_pid_multiplier_is_fsrls_controller_without_a_first_step_kick():
    """The same controller and the same sequence as tests/test_sac_lagrangian.py; the first cost (16.9) is under the
    limit (25), so lambda stays 0 where a derivative against a previous cost of 0 would make it 1.29."""
    kp, ki, kd = FSRL_GAINS
    costs = [cost for cost, _ in PID_COSTS]
    _, multipliers = run_updates(costs, cost_limit=PID_COST_LIMIT, pid_kp=kp, pid_ki=ki, pid_kd=kd)
    np.testing.assert_allclose(multipliers, fsrl_pid_multipliers(costs, PID_COST_LIMIT, kp, ki, kd), rtol=1e-5,
                               atol=1e-6)
    assert multipliers[0] == 0.0


def test_gradient_multiplier_rises_above_limit_and_falls_to_zero_below():
    _, rising = run_updates([40.0] * 20, lagrangian_method="gradient")
    assert rising[0] > 0.001 and np.all(np.diff(rising) > 0)
    _, falling = run_updates([10.0] * 40, lagrangian_method="gradient", lagrange_init=0.5)
    assert falling[0] < 0.5 and np.all(np.diff(falling) <= 0)
    assert falling.min() == 0.0 and falling[-1] == 0.0  # projected, not negative


@pytest.mark.parametrize("method", ["gradient", "pid"])
def test_zero_cost_limit_gives_finite_multipliers(method):
    lagrange, multipliers = run_updates([0.0, 0.0, 3.0, 0.0, 0.0], lagrangian_method=method, cost_limit=0.0)
    assert np.all(np.isfinite(multipliers)) and np.all(multipliers >= 0)
    assert multipliers[2] > multipliers[1]  # any cost exceeds a zero budget
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(lagrange))


def test_multiplier_sees_the_mean_cost_of_the_last_100_episodes_across_rollouts():
    """OmniSafe's window: lambda follows the last lagrange_window episodes, not just the current rollout's, and the
    window is part of the state, so a checkpoint carries it."""
    lagrange = init_lagrange(Args())
    lagrange = add_episode_costs(lagrange, [10.0] * 30)
    assert window_mean_cost(lagrange) == 10.0  # fewer episodes than the window: their mean
    for _ in range(4):  # rollouts of 20 episodes each
        lagrange = add_episode_costs(lagrange, [40.0] * 20)
    assert window_mean_cost(lagrange) == pytest.approx((20 * 10.0 + 80 * 40.0) / 100)
    lagrange = add_episode_costs(lagrange, [0.0] * 60)
    assert window_mean_cost(lagrange) == pytest.approx((40 * 40.0 + 60 * 0.0) / 100)
    restored = flax.serialization.from_state_dict(init_lagrange(Args()), flax.serialization.to_state_dict(lagrange))
    assert window_mean_cost(restored) == window_mean_cost(lagrange) and int(restored.episodes_seen) == 170


def test_observation_normaliser_floors_the_std_at_001_and_clips_at_5():
    """OmniSafe's Normalizer: a feature that has hardly varied is divided by 0.01, not by its near-zero std."""
    normalizer = ObsNormalizer(mean=jnp.zeros(2), var=jnp.ones(2), count=jnp.asarray(1e-4))
    normalizer = update_obs_normalizer(normalizer, jnp.tile(jnp.array([3.0, 0.0]), (1000, 1)))
    assert float(jnp.sqrt(normalizer.var[0])) < 1e-3
    normalized = np.asarray(normalize_obs(normalizer, jnp.array([[3.001, 1e3], [2.999, -1e3]])))
    np.testing.assert_allclose(normalized, [[0.1, 5.0], [-0.1, -5.0]], rtol=1e-2)


def episode_summary(records, first_rollout_steps):
    """The return of the initial policy (the episodes of the first rollout), and the return and cost at the end."""
    episodes = [r for r in records if "charts/episodic_return" in r]
    assert len(episodes) >= 100
    first = [r for r in episodes if r["global_step"] <= first_rollout_steps]
    last = episodes[-len(episodes) // 5:]
    mean = lambda rows, name: float(np.mean([r[f"charts/episodic_{name}"] for r in rows]))
    return {"first_return": mean(first, "return"), "last_return": mean(last, "return"), "last_cost": mean(last, "cost")}


def test_default_multiplier_holds_the_limit_on_the_toy_task(tmp_path):
    """The default multiplier (PID with OmniSafe's gains, 100-episode window), as a default run meets it: 100
    updates (the default 1M steps in rollouts of 10k) of 10 episodes each (10k steps of a 1000-step task), here
    20-step episodes. A tight budget (d = 5) and one that never binds (d = 1000) run in parallel: both improve
    their return; the tight run ends at its budget, the loose one drives fast (optimum: return 20, cost 20).

    A Lagrangian run settles at its limit, not under it (the integral term holds the mean cost there): seeds 1-4
    end at 5.2, 5.5, 4.9, 5.0 over the last fifth of the episodes, so the check allows one unit over the budget.
    """
    flags = ["--env-id", TOY_ENV, "--no-async-envs", "--eval-every", 0, "--eval-episodes", 2, "--seed", 1,
             "--num-envs", 8, "--num-steps", 25, "--total-timesteps", 20_000]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    runs = {}
    for name, cost_limit in [("tight", 5), ("loose", 1000)]:
        (tmp_path / name).mkdir()
        runs[name] = subprocess.Popen(script_command(SCRIPT, *flags, "--cost-limit", cost_limit, "--exp-name", name),
                                      cwd=tmp_path / name, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
    for process in runs.values():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    tight, loose = [episode_summary(read_metrics(only_run_dir(tmp_path / name)), 8 * 25) for name in runs]
    assert tight["last_return"] > tight["first_return"] + 4.0, tight
    assert tight["last_cost"] <= 5.0 + 1.0, tight
    assert loose["last_return"] > loose["first_return"] + 10.0, loose
    assert loose["last_cost"] >= 10.0, loose


def test_safety_point_goal_end_to_end_with_checkpoint_evaluation(tmp_path):
    """One 2 x 1000-step rollout of SafetyPointGoal1 (both episodes hit the time limit) with --cost-limit 0, then
    --eval-checkpoint on the checkpoint it saved."""
    result = run_script(SCRIPT, "--env-id", "SafetyPointGoal1-v0", "--num-envs", 2, "--num-steps", 1000,
                        "--total-timesteps", 2000, "--cost-limit", 0, "--save-model", "--eval-episodes", 1,
                        "--exp-name", "e2e", cwd=tmp_path, timeout=150)
    assert "eval return" in result.stdout
    run_dir = only_run_dir(tmp_path)
    records = read_metrics(run_dir)
    for record in records:
        assert all(np.isfinite(value) for value in record.values()), record
    (update,) = [r for r in records if "charts/lagrange_multiplier" in r]
    assert update["global_step"] == 2000
    for name in ["losses/policy", "losses/value_reward", "losses/value_cost", "losses/entropy", "losses/approx_kl",
                 "charts/SPS"]:
        assert name in update
    (episodes,) = [r for r in records if "charts/episodic_return" in r]
    assert episodes["charts/episodic_length"] == 1000 and episodes["charts/cost_limit"] == 0
    assert any("eval/episodic_return" in r for r in records)

    checkpoint_path = run_dir / "checkpoints" / "checkpoint.pkl"
    with open(checkpoint_path, "rb") as file:
        checkpoint = pickle.load(file)
    assert {"args", "run_name", "global_step", "key", "state"} <= set(checkpoint)
    assert checkpoint["global_step"] == 2000 and checkpoint["args"]["cost_limit"] == 0
    assert {"actor", "reward_critic", "cost_critic", "obs_normalizer", "lagrange"} <= set(checkpoint["state"])
    assert checkpoint["state"]["obs_normalizer"]["count"] >= 2000
    assert checkpoint["state"]["lagrange"]["episodes_seen"] == 2  # the multiplier's episode window is saved

    result = run_script(SCRIPT, "--eval-checkpoint", checkpoint_path, "--eval-episodes", 1, cwd=tmp_path, timeout=90)
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["global_step"] == 2000 and evaluation["episodes"] == 1
    assert np.isfinite(evaluation["eval/episodic_return"]) and evaluation["eval/episodic_cost"] >= 0
    assert "eval/penalized_return" in evaluation
