import json
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from tests.helpers import TOY_ENV, only_run_dir, read_metrics, run_script

import sac_lagrangian_jax as sac


def fill_buffer(steps=11, num_envs=2, seed=2):
    """A buffer whose observation (t, env) names each transition, with terminations and truncations."""
    rng = np.random.default_rng(seed)
    rewards, costs = rng.normal(size=(steps, num_envs)), rng.integers(0, 2, size=(steps, num_envs)).astype(float)
    terminated = np.zeros((steps, num_envs), bool)
    truncated = np.zeros((steps, num_envs), bool)
    terminated[[3, 8], 0], truncated[[5], 0], truncated[[2, 7], 1], terminated[[9], 1] = True, True, True, True
    buffer = sac.ReplayBuffer(capacity=steps * num_envs, num_envs=num_envs, obs_dim=2, action_dim=1)
    for t in range(steps):
        obs = np.stack([np.full(num_envs, t), np.arange(num_envs)], axis=1)
        buffer.add(obs=obs, actions=np.zeros((num_envs, 1)), rewards=rewards[t], costs=costs[t],
                   next_obs=obs + [0.5, 0], terminated=terminated[t], episode_ended=terminated[t] | truncated[t])
    return buffer, rewards, costs, terminated, truncated


def fake_target_critics(bootstrap_obs):
    """Stand-ins for the target critics and log pi at the bootstrap state: (Q_r1, Q_r2, Q_c), log pi."""
    x, env = np.asarray(bootstrap_obs, np.float64).T
    return np.stack([0.3 * x + env, 2.0 - 0.1 * x, 0.5 * x + 1.0]), -0.2 * x + 0.1


def test_critic_targets_match_a_numpy_computation():
    n_step, gamma, alpha = 3, 0.9, 0.7
    buffer, rewards, costs, terminated, truncated = fill_buffer()
    batch = buffer.sample_n_step(np.random.default_rng(3), (400,), n_step, gamma)
    next_q, next_log_prob = fake_target_critics(batch["bootstrap_obs"])
    reward_target, cost_target = map(np.asarray, sac.critic_targets(
        {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(next_q), jnp.asarray(next_log_prob), alpha))
    cut_by_terminal = kept_after_truncation = 0
    for i in range(len(reward_target)):
        t, env = map(int, batch["obs"][i])
        reward_return = cost_return = 0.0
        for k in range(n_step):
            if t + k >= len(rewards):
                break
            reward_return += gamma**k * rewards[t + k, env]
            cost_return += gamma**k * costs[t + k, env]
            last = t + k
            if terminated[last, env] or truncated[last, env]:
                break
        (q_r1, q_r2, q_c), log_prob = fake_target_critics([[last + 0.5, env]])
        if terminated[last, env]:
            expected_reward, expected_cost = reward_return, cost_return
            cut_by_terminal += 1
        else:
            discount = gamma ** (last - t + 1)
            expected_reward = reward_return + discount * (min(q_r1[0], q_r2[0]) - alpha * log_prob[0])
            expected_cost = cost_return + discount * q_c[0]  # no entropy term in the cost target
            kept_after_truncation += bool(truncated[last, env])
        np.testing.assert_allclose(reward_target[i], expected_reward, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cost_target[i], expected_cost, rtol=1e-5, atol=1e-5)
    assert cut_by_terminal > 0 and kept_after_truncation > 0
    _, cost_target_without_entropy = sac.critic_targets(batch, next_q, next_log_prob, 0.0)
    np.testing.assert_allclose(cost_target_without_entropy, cost_target, rtol=1e-6)


def test_cost_critic_learns_the_cost_not_the_reward():
    """The known bug elsewhere: a cost critic trained on the reward. Swapping the two must swap what it learns."""
    batch = fill_buffer()[0].sample_n_step(np.random.default_rng(0), (64,), 1, 0.9)
    swapped = {**batch, "reward_return": batch["cost_return"], "cost_return": batch["reward_return"]}
    next_q, next_log_prob = fake_target_critics(batch["bootstrap_obs"])
    assert not np.allclose(sac.critic_targets(batch, next_q, next_log_prob, 0.5)[1],
                           sac.critic_targets(swapped, next_q, next_log_prob, 0.5)[1])

    args = sac.Args(hidden_sizes=(32, 32), critic_lr=1e-2, tau=1.0)
    actor, critic = sac.Actor(1, args.hidden_sizes), sac.CriticEnsemble(args.hidden_sizes)
    init_state, _, train_round = sac.make_train_functions(args, actor, critic, jnp.ones(1), jnp.zeros(1), 1)
    obs = np.random.default_rng(1).normal(size=(300, 64, 2)).astype(np.float32)
    reward, cost = -1.0, 1.0  # constant one-step targets: bootstrap_discount 0
    batches = {"obs": obs, "actions": np.zeros((300, 64, 1), np.float32), "bootstrap_obs": obs,
               "bootstrap_discount": np.zeros((300, 64), np.float32)}

    def learned_values(reward_return, cost_return):
        state, metrics = train_round(init_state(jax.random.PRNGKey(0), 2), {
            **batches, "reward_return": np.full((300, 64), reward_return, np.float32),
            "cost_return": np.full((300, 64), cost_return, np.float32)}, jax.random.PRNGKey(1))
        assert np.isfinite(metrics["losses/critic_cost"])
        return np.asarray(critic.apply(state.critic.params, obs[0], batches["actions"][0]).mean(axis=1))

    np.testing.assert_allclose(learned_values(reward, cost), [reward, reward, cost], atol=0.1)
    np.testing.assert_allclose(learned_values(cost, reward), [cost, cost, reward], atol=0.1)


def test_pid_and_gradient_multipliers():
    kp, ki, kd, limit = 0.05, 0.0005, 0.1, 25.0
    sequence = [(40.0, 4), (60.0, 2), (30.0, 4), (10.0, 1), (0.0, 4), (0.0, 4), (26.0, 3)]  # (mean cost, episodes)
    integral = previous_error = 0.0
    state = (0.0, limit)
    for cost, episodes in sequence:  # smoothing 0 is FSRL's controller, written in its own error form
        error = cost - limit
        integral = max(0.0, integral + error)
        expected = max(0.0, kp * error + ki * integral + kd * max(0.0, error - previous_error))
        previous_error = error
        lagrange, *state = sac.pid_lagrange(*state, cost, episodes, limit, kp, ki, kd, 0.0)
        np.testing.assert_allclose(lagrange, expected, rtol=1e-6, atol=1e-7)

    smoothing, integral, smoothed = 0.95, 0.0, limit
    state = (0.0, limit)
    for cost, episodes in sequence:  # the moving average runs over episodes: one update per episode
        previous_smoothed = smoothed
        for _ in range(episodes):
            smoothed = smoothing * smoothed + (1 - smoothing) * cost
        integral = max(0.0, integral + cost - limit)
        expected = max(0.0, kp * (smoothed - limit) + ki * integral + kd * max(0.0, smoothed - previous_smoothed))
        lagrange, *state = sac.pid_lagrange(*state, cost, episodes, limit, kp, ki, kd, smoothing)
        np.testing.assert_allclose(lagrange, expected, rtol=1e-5, atol=1e-6)

    for method in ("pid", "gradient"):
        for cost_limit, costs in [(1.0, [3.0] * 3 + [0.0] * 30), (0.0, [0.0, 0.0, 2.0, 0.0])]:  # a limit of 0 is valid
            args = sac.Args(lagrangian_method=method, cost_limit=cost_limit, hidden_sizes=(8,))
            init_state, update_multiplier, _ = sac.make_train_functions(
                args, sac.Actor(1, args.hidden_sizes), sac.CriticEnsemble(args.hidden_sizes), jnp.ones(1),
                jnp.zeros(1), 1)
            state, lagrange_values = init_state(jax.random.PRNGKey(0), 2), []
            for cost in costs:
                state, _ = update_multiplier(state, cost, 2)
                lagrange_values.append(float(state.lagrange))
            assert np.all(np.isfinite(lagrange_values)) and min(lagrange_values) >= 0.0, method
            if cost_limit > 0:  # lambda rises while the cost exceeds the limit and falls once it is met
                assert lagrange_values[2] > 0.0 and lagrange_values[-1] < max(lagrange_values), method


# Tuned for the toy task, not the defaults: a faster integral than FSRL's, so the constraint binds within the
# budget, and no smoothing, as each multiplier step already averages 10 episodes; the first 20% of the episodes
# come from the initial policy (before --learning-starts).
TOY_FLAGS = ["--env-id", TOY_ENV, "--num-envs", 4, "--no-async-envs", "--total-timesteps", 20000,
             "--learning-starts", 4000, "--update-interval", 200, "--gamma", 0.9, "--n-step", 1, "--batch-size", 128,
             "--hidden-sizes", 64, 64, "--initial-alpha", 0.1, "--pid-kp", 0.05, "--pid-ki", 0.005, "--pid-kd", 0.1,
             "--pid-cost-smoothing", 0, "--eval-every", 0, "--eval-episodes", 2]


def test_sac_lagrangian_keeps_the_cost_under_the_limit_on_the_toy_task(tmp_path):
    def train(cost_limit):
        cwd = tmp_path / f"limit{cost_limit}"
        cwd.mkdir()
        run_script("sac_lagrangian_jax.py", *TOY_FLAGS, "--cost-limit", cost_limit, "--exp-name", f"limit{cost_limit}",
                   cwd=cwd)
        metrics = read_metrics(only_run_dir(cwd))
        episodes = [r for r in metrics if "charts/episodic_return" in r]
        tail = max(1, len(episodes) // 5)
        returns = np.array([r["charts/episodic_return"] for r in episodes])
        costs = np.array([r["charts/episodic_cost"] for r in episodes])
        lagrange = max(r.get("charts/lagrange_multiplier", 0.0) for r in metrics)
        return returns[:tail].mean(), returns[-tail:].mean(), costs[-tail:].mean(), lagrange

    with ThreadPoolExecutor(2) as pool:
        tight, loose = pool.map(train, [5, 1000])
    first_return, last_return, last_cost, max_lagrange = tight
    assert last_return > first_return + 1.0
    assert last_cost <= 5.0 and max_lagrange > 0.0
    first_return, last_return, loose_cost, loose_lagrange = loose
    assert last_return > first_return + 5.0
    assert loose_cost >= 10.0 and loose_lagrange == 0.0  # the limit is what holds the cost down


def test_end_to_end_safety_point_goal_with_checkpoint_evaluation(tmp_path):
    run_script("sac_lagrangian_jax.py", "--env-id", "SafetyPointGoal1-v0", "--total-timesteps", 2000, "--num-envs", 2,
               "--no-async-envs", "--learning-starts", 1000, "--update-interval", 500, "--buffer-size", 10000,
               "--eval-every", 0, "--eval-episodes", 1, "--save-model", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    metrics = read_metrics(run_dir)
    assert metrics[-1]["global_step"] == 2000 and "eval/episodic_return" in metrics[-1]
    logged = set().union(*metrics)
    for name in ["charts/episodic_return", "charts/episodic_cost", "charts/episodic_length", "charts/SPS",
                 "charts/cost_limit", "charts/lagrange_multiplier", "charts/alpha", "charts/updates_per_second",
                 "losses/critic_reward", "losses/critic_cost", "losses/actor", "losses/alpha"]:
        assert name in logged, name
    checkpoint = run_dir / "checkpoints" / "checkpoint.pkl"
    result = run_script("sac_lagrangian_jax.py", "--eval-checkpoint", checkpoint, "--eval-episodes", 1, cwd=tmp_path)
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["global_step"] == 2000 and np.isfinite(evaluation["eval/episodic_cost"])
    np.testing.assert_allclose(evaluation["eval/episodic_return"], metrics[-1]["eval/episodic_return"], rtol=1e-4)
