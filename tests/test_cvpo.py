import json
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers import TOY_ENV, only_run_dir, read_metrics, run_script
from scipy.optimize import minimize

import cvpo_jax

EPS_KL = 0.02


def q_values(seed, correlation, batch=128, samples=16):
    """Q matrices where reward and cost rise together along the sampled actions."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, samples))
    q_cost = 1.0 + 0.3 * z + 0.1 * rng.normal(size=(batch, samples))
    q_reward = correlation * z + 5.0 * rng.normal(size=(batch, 1))
    return q_reward.astype(np.float32), q_cost.astype(np.float32)


def slsqp_duals(q_reward, q_cost, eps_kl, eps_cost):
    """The same dual, written independently in float64 and minimised by scipy's SLSQP."""
    q_reward, q_cost = q_reward.astype(np.float64), q_cost.astype(np.float64)

    def dual(x):
        eta, lagrange = x
        scaled = (q_reward - lagrange * q_cost) / eta
        top = scaled.max(axis=1, keepdims=True)
        log_mean_exp = top[:, 0] + np.log(np.mean(np.exp(scaled - top), axis=1))
        return eta * eps_kl + lagrange * eps_cost + eta * np.mean(log_mean_exp)

    result = minimize(dual, [1.0, 0.5], method="SLSQP", bounds=[(1e-6, 20.0), (0.0, 20.0)],
                      options={"ftol": 1e-12, "maxiter": 1000})
    return result.x


def solve(q_reward, q_cost, eps_cost):
    log_duals, _ = cvpo_jax.solve_estep_dual(jnp.log(jnp.array([1.0, 1e-6])), q_reward, q_cost, EPS_KL, eps_cost,
                                             0.1, 5000, 1e-7, 1e-6, 20.0)
    eta, lagrange = np.exp(np.asarray(log_duals, np.float64))
    weights = np.exp((q_reward - lagrange * q_cost) / eta - np.max((q_reward - lagrange * q_cost) / eta, 1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    kl = np.mean(np.sum(weights * np.log(weights * q_reward.shape[1] + 1e-30), axis=1))
    q_cost_under_q = np.mean(np.sum(weights * q_cost, axis=1))
    return eta, lagrange, kl, q_cost_under_q


@pytest.mark.parametrize("correlation, eps_cost", [(2.0, 0.95), (1.0, 0.97), (0.5, 1.2), (1.0, 2.0)])
def test_estep_dual_matches_slsqp_and_satisfies_both_bounds(correlation, eps_cost):
    q_reward, q_cost = q_values(0, correlation)
    eta, lagrange, kl, q_cost_under_q = solve(q_reward, q_cost, eps_cost)
    reference_eta, reference_lagrange = slsqp_duals(q_reward, q_cost, EPS_KL, eps_cost)
    np.testing.assert_allclose(eta, reference_eta, rtol=2e-3)
    np.testing.assert_allclose(lagrange, reference_lagrange, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(kl, EPS_KL, rtol=2e-2)  # the KL bound binds at an interior eta
    assert q_cost_under_q <= eps_cost + 1e-3
    cost_without_constraint = solve(q_reward, q_cost, 1e6)[3]
    if cost_without_constraint > eps_cost:  # the cost constraint binds: lambda > 0 and the cost sits on the bound
        assert lagrange > 1e-2
        np.testing.assert_allclose(q_cost_under_q, eps_cost, rtol=1e-3)
    else:
        assert lagrange < 1e-5


def test_estep_covers_both_regimes():
    q_reward, q_cost = q_values(0, 2.0)
    assert solve(q_reward, q_cost, 1e6)[3] > 0.95  # (2.0, 0.95) above is a binding case
    q_reward, q_cost = q_values(0, 1.0)
    assert solve(q_reward, q_cost, 1e6)[3] < 2.0  # (1.0, 2.0) above is a slack case


def gaussian_kl(mean_p, std_p, mean_q, std_q):
    """KL(N(mean_p, std_p) || N(mean_q, std_q)) for diagonal Gaussians, summed over dimensions."""
    return np.sum(np.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5, axis=-1)


def test_decoupled_kl_terms_match_direct_gaussian_kl():
    rng = np.random.default_rng(1)
    mean_old, mean = rng.normal(size=(2, 32, 3))
    std_old, std = np.exp(rng.normal(scale=0.5, size=(2, 32, 3)))
    kl_mean, kl_std = cvpo_jax.decoupled_gaussian_kl(mean_old, std_old, mean, std)
    np.testing.assert_allclose(kl_mean, np.mean(gaussian_kl(mean_old, std_old, mean, std_old)), rtol=1e-5)
    np.testing.assert_allclose(kl_std, np.mean(gaussian_kl(mean_old, std_old, mean_old, std)), rtol=1e-5)
    # Monte Carlo check of one direct KL, independent of any closed form.
    samples = mean_old[0] + std_old[0] * rng.normal(size=(200_000, 3))
    log_ratio = np.sum(-0.5 * ((samples - mean_old[0]) / std_old[0]) ** 2 - np.log(std_old[0])
                       + 0.5 * ((samples - mean_old[0]) / std[0]) ** 2 + np.log(std[0]), axis=-1)
    np.testing.assert_allclose(log_ratio.mean(), gaussian_kl(mean_old[0], std_old[0], mean_old[0], std[0]), rtol=0.05)


def test_n_step_targets_match_a_plain_loop():
    num_envs, steps, n_step, gamma = 2, 11, 3, 0.9
    rng = np.random.default_rng(2)
    buffer = cvpo_jax.ReplayBuffer(capacity=14, num_envs=num_envs, obs_dim=2, action_dim=1)  # 7 rows: wraps
    rewards, costs = rng.normal(size=(steps, num_envs)), rng.integers(0, 2, size=(steps, num_envs)).astype(float)
    terminated = rng.random((steps, num_envs)) < 0.15
    truncated = ~terminated & (rng.random((steps, num_envs)) < 0.15)
    for t in range(steps):
        obs = np.stack([np.full(num_envs, t), np.arange(num_envs)], axis=1)
        next_obs = obs + np.array([0.5, 0.0])  # the true next state, final observations included
        buffer.add(obs=obs, actions=np.zeros((num_envs, 1)), rewards=rewards[t], costs=costs[t], next_obs=next_obs,
                   terminated=terminated[t], episode_ended=terminated[t] | truncated[t])
    batch = buffer.sample_n_step(np.random.default_rng(3), (500,), n_step, gamma)
    seen = set()
    for i in range(500):
        t, env = map(int, batch["obs"][i])
        assert steps - 7 <= t < steps  # only rows still in the buffer
        seen.add((t, env))
        reward_return = cost_return = 0.0
        for k in range(n_step):
            if t + k >= steps:
                break  # not collected yet: bootstrap from the newest transition
            reward_return += gamma**k * rewards[t + k, env]
            cost_return += gamma**k * costs[t + k, env]
            last = t + k
            if terminated[t + k, env] or truncated[t + k, env]:
                break
        discount = 0.0 if terminated[last, env] else gamma ** (last - t + 1)
        np.testing.assert_allclose(batch["reward_return"][i], reward_return, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch["cost_return"][i], cost_return, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch["bootstrap_discount"][i], discount, rtol=1e-6)
        np.testing.assert_allclose(batch["bootstrap_obs"][i], [last + 0.5, env])
    assert len(seen) == 14


def test_cost_threshold_is_the_per_step_budget_discounted_over_an_episode():
    d, gamma, length = 25.0, 0.99, 1000
    assert np.isclose(cvpo_jax.cost_threshold(d, gamma, length), sum(d / length * gamma**t for t in range(length)))
    assert cvpo_jax.cost_threshold(0.0, gamma, length) == 0.0


TOY_FLAGS = ["--env-id", TOY_ENV, "--num-envs", 4, "--no-async-envs", "--learning-starts", 1000,
             "--update-interval", 200, "--gamma", 0.9, "--n-step", 1, "--batch-size", 128, "--hidden-sizes", 64, 64,
             "--eval-every", 0, "--eval-episodes", 2, "--total-timesteps", 16000]


def test_cvpo_keeps_the_cost_under_the_limit_on_the_toy_task(tmp_path):
    def train(cost_limit):
        cwd = tmp_path / f"limit{cost_limit}"
        cwd.mkdir()
        run_script("cvpo_jax.py", *TOY_FLAGS, "--cost-limit", cost_limit, cwd=cwd)
        episodes = [r for r in read_metrics(only_run_dir(cwd)) if "charts/episodic_return" in r]
        tail = max(1, len(episodes) // 5)
        returns = np.array([r["charts/episodic_return"] for r in episodes])
        costs = np.array([r["charts/episodic_cost"] for r in episodes])
        return returns[:tail].mean(), returns[-tail:].mean(), costs[-tail:].mean()

    with ThreadPoolExecutor(2) as pool:
        (first_return, last_return, last_cost), (_, loose_return, loose_cost) = pool.map(train, [5, 1000])
    assert last_return > first_return + 2.0
    assert last_cost <= 5.0
    assert loose_cost >= 15.0 and loose_return >= 15.0  # the limit is what holds the cost down


def test_end_to_end_safety_point_goal_with_checkpoint_evaluation(tmp_path):
    run_script("cvpo_jax.py", "--env-id", "SafetyPointGoal1-v0", "--total-timesteps", 2000, "--num-envs", 2,
               "--learning-starts", 1000, "--update-interval", 500, "--buffer-size", 10000, "--eval-every", 0,
               "--eval-episodes", 1, "--save-model", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    metrics = read_metrics(run_dir)
    assert metrics[-1]["global_step"] == 2000 and "eval/episodic_return" in metrics[-1]
    assert any("charts/estep_eta" in r for r in metrics)
    checkpoint = run_dir / "checkpoints" / "checkpoint.pkl"
    result = run_script("cvpo_jax.py", "--eval-checkpoint", checkpoint, "--eval-episodes", 1, cwd=tmp_path)
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["global_step"] == 2000 and np.isfinite(evaluation["eval/episodic_cost"])
    np.testing.assert_allclose(evaluation["eval/episodic_return"], metrics[-1]["eval/episodic_return"], rtol=1e-4)
