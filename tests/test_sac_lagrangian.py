import json
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers import (FSRL_GAINS, PID_COST_LIMIT, PID_COSTS, TOY_ENV, fsrl_pid_multipliers, only_run_dir,
                           read_metrics, run_script)

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
    """Stand-ins for the target critics and log pi at the bootstrap state: (Q_r1, Q_r2, Q_c1, Q_c2), log pi. The
    cost critics cross, and both are negative early in each env's time line."""
    x, env = np.asarray(bootstrap_obs, np.float64).T
    return np.stack([0.3 * x + env, 2.0 - 0.1 * x, 0.5 * x - 2.0 + env, 0.5 - 0.4 * x]), -0.2 * x + 0.1


def test_critic_targets_match_a_numpy_computation():
    n_step, gamma, alpha = 3, 0.9, 0.7
    buffer, rewards, costs, terminated, truncated = fill_buffer()
    batch = buffer.sample_n_step(np.random.default_rng(3), (400,), n_step, gamma)
    next_q, next_log_prob = fake_target_critics(batch["bootstrap_obs"])
    reward_target, cost_target = map(np.asarray, sac.critic_targets(
        {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(next_q), jnp.asarray(next_log_prob), alpha))
    cut_by_terminal = kept_after_truncation = floored = 0
    each_critic_wins = [False, False]
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
        (q_r1, q_r2, q_c1, q_c2), log_prob = fake_target_critics([[last + 0.5, env]])
        if terminated[last, env]:
            expected_reward, expected_cost = reward_return, cost_return
            cut_by_terminal += 1
        else:
            discount = gamma ** (last - t + 1)
            expected_reward = reward_return + discount * (min(q_r1[0], q_r2[0]) - alpha * log_prob[0])
            # The larger cost critic, never below 0, and no entropy term in the cost target.
            expected_cost = cost_return + discount * max(q_c1[0], q_c2[0], 0.0)
            kept_after_truncation += bool(truncated[last, env])
            floored += max(q_c1[0], q_c2[0]) < 0
            each_critic_wins[int(q_c2[0] > q_c1[0])] = True
        np.testing.assert_allclose(reward_target[i], expected_reward, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cost_target[i], expected_cost, rtol=1e-5, atol=1e-5)
    assert cut_by_terminal > 0 and kept_after_truncation > 0 and floored > 0 and all(each_critic_wins)
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

    np.testing.assert_allclose(learned_values(reward, cost), [reward, reward, cost, cost], atol=0.1)
    np.testing.assert_allclose(learned_values(cost, reward), [cost, cost, reward, reward], atol=0.1)


def test_cost_critic_learns_the_cost_to_go_and_is_never_negative():
    """A task whose cost no action changes: each step costs 1 with probability 0.05 and episodes are truncated every
    100 steps, so Q_c = E[c] / (1 - gamma), about 5, for every state and action. The real jitted rounds train on what
    the actor collects, with lambda held at 5, so the actor does all it can to lower Q_c. A single cost critic is
    talked down by it (seeds 0-2 stall 30-38% low and keep falling); the max of twin cost critics with bootstraps
    floored at 0 ends within 3%. A constant cost would not show it: it leaves no differences between actions for the
    actor to exploit."""
    obs_dim, action_dim, num_envs, episode_length, cost_probability = 4, 2, 4, 100, 0.05
    args = sac.Args(hidden_sizes=(64, 64), batch_size=128, gamma=0.99, n_step=3)
    actor, critic = sac.Actor(action_dim, args.hidden_sizes), sac.CriticEnsemble(args.hidden_sizes)
    scale, bias = jnp.ones(action_dim), jnp.zeros(action_dim)
    init_state, _, train_round = sac.make_train_functions(args, actor, critic, scale, bias, action_dim)
    sample_actions = jax.jit(lambda params, obs, key: sac.squashed_gaussian_sample(
        *actor.apply(params, obs), key, scale, bias)[0])
    state = init_state(jax.random.PRNGKey(0), obs_dim).replace(lagrange=jnp.asarray(5.0))
    buffer = sac.ReplayBuffer(12_000, num_envs, obs_dim, action_dim)
    rng, key, q_cost = np.random.default_rng(0), jax.random.PRNGKey(1), []
    obs = rng.normal(size=(num_envs, obs_dim)).astype(np.float32)
    for step in range(1, 3001):  # 60 rounds of 50 steps of 4 envs, each followed by 200 updates
        key, action_key, round_key = jax.random.split(key, 3)
        next_obs = rng.normal(size=(num_envs, obs_dim)).astype(np.float32)
        buffer.add(obs=obs, actions=np.asarray(sample_actions(state.actor.params, obs, action_key)),
                   rewards=np.zeros(num_envs), costs=(rng.random(num_envs) < cost_probability).astype(np.float32),
                   next_obs=next_obs, terminated=np.zeros(num_envs, bool),
                   episode_ended=np.full(num_envs, step % episode_length == 0))
        obs = next_obs
        if step % 50 == 0:
            batches = buffer.sample_n_step(rng, (200, args.batch_size), args.n_step, args.gamma)
            state, metrics = train_round(state, batches, round_key)
            q_cost.append(float(metrics["charts/q_cost"]))  # at the actor's actions
    cost_to_go = buffer.data["costs"].mean() / (1 - args.gamma)
    np.testing.assert_allclose(np.mean(q_cost[-10:]), cost_to_go, rtol=0.15)
    assert min(q_cost) >= 0.0
    test_obs = rng.normal(size=(1000, obs_dim)).astype(np.float32)
    for actions in (sample_actions(state.actor.params, test_obs, key), rng.uniform(-1, 1, (1000, action_dim))):
        assert float(critic.apply(state.critic.params, test_obs, actions)[sac.COST_CRITICS].min()) >= 0.0


def test_a_negative_cost_stops_the_run_with_one_line():
    with pytest.raises(SystemExit) as stopped:
        sac.step_costs({"cost": np.array([0.0, -1.0]), "_cost": np.array([True, True])}, 2)
    assert str(stopped.value.code).startswith("error: the env reported a negative cost (-1.0)")


def make_update_multiplier(**flags):
    args = sac.Args(hidden_sizes=(8,), **flags)
    init_state, update_multiplier, _ = sac.make_train_functions(
        args, sac.Actor(1, args.hidden_sizes), sac.CriticEnsemble(args.hidden_sizes), jnp.ones(1), jnp.zeros(1), 1)
    return init_state(jax.random.PRNGKey(0), 2), update_multiplier


def test_pid_multiplier_is_fsrls_controller_and_smooths_over_episodes():
    """With smoothing 0, the same controller and the same sequence as tests/test_ppo_lagrangian.py, from the initial
    state: no derivative kick while the first cost is under the limit."""
    kp, ki, kd = FSRL_GAINS
    state, update_multiplier = make_update_multiplier(cost_limit=PID_COST_LIMIT, pid_kp=kp, pid_ki=ki, pid_kd=kd,
                                                      pid_cost_smoothing=0.0)
    multipliers = []
    for cost, episodes in PID_COSTS:
        state, _ = update_multiplier(state, cost, episodes)
        multipliers.append(float(state.lagrange))
    expected = fsrl_pid_multipliers([cost for cost, _ in PID_COSTS], PID_COST_LIMIT, kp, ki, kd)
    np.testing.assert_allclose(multipliers, expected, rtol=1e-5, atol=1e-6)
    assert multipliers[0] == 0.0

    smoothing, integral, smoothed, limit = 0.95, 0.0, PID_COST_LIMIT, PID_COST_LIMIT
    state = (0.0, limit)
    for cost, episodes in PID_COSTS:  # the moving average runs over episodes: one update per episode
        previous_smoothed = smoothed
        for _ in range(episodes):
            smoothed = smoothing * smoothed + (1 - smoothing) * cost
        integral = max(0.0, integral + cost - limit)
        expected = max(0.0, kp * (smoothed - limit) + ki * integral + kd * max(0.0, smoothed - previous_smoothed))
        lagrange, *state = sac.pid_lagrange(*state, cost, episodes, limit, kp, ki, kd, smoothing)
        np.testing.assert_allclose(lagrange, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["pid", "gradient"])
def test_multiplier_rises_above_the_limit_falls_below_and_takes_a_zero_limit(method):
    for cost_limit, costs in [(1.0, [3.0] * 3 + [0.0] * 30), (0.0, [0.0, 0.0, 2.0, 0.0])]:  # a limit of 0 is valid
        state, update_multiplier = make_update_multiplier(lagrangian_method=method, cost_limit=cost_limit)
        lagrange_values = []
        for cost in costs:
            state, _ = update_multiplier(state, cost, 2)
            lagrange_values.append(float(state.lagrange))
        assert np.all(np.isfinite(lagrange_values)) and min(lagrange_values) >= 0.0
        if cost_limit > 0:  # lambda rises while the cost exceeds the limit and falls once it is met
            assert lagrange_values[2] > 0.0 and lagrange_values[-1] < max(lagrange_values)


# The other flags suit the toy task; the episodes before --learning-starts come from the initial policy.
LEARNING_STARTS = 4000
TOY_FLAGS = ["--env-id", TOY_ENV, "--num-envs", 4, "--no-async-envs", "--total-timesteps", 40_000,
             "--learning-starts", LEARNING_STARTS, "--update-interval", 200, "--gamma", 0.9, "--n-step", 1,
             "--batch-size", 128, "--hidden-sizes", 64, 64, "--initial-alpha", 0.1, "--eval-every", 0,
             "--eval-episodes", 2]


def test_default_multiplier_keeps_the_cost_under_the_limit_on_the_toy_task(tmp_path):
    """The default multiplier (PID with FSRL's gains, smoothed over episodes), one step per round as in a default
    run: 180 rounds of 200 steps (10 toy episodes) after --learning-starts, of the 500 rounds a default run of 1M
    steps has. A tight budget (d = 5) and one that never binds (d = 1000) run in parallel. The tight run goes fast
    at first, until the integral term has built lambda up (about 80 rounds), then settles under the limit (seeds 1-3:
    4.1, 3.4, 4.1 over the last fifth of the episodes)."""
    def train(cost_limit):
        cwd = tmp_path / f"limit{cost_limit}"
        cwd.mkdir()
        run_script("sac_lagrangian_jax.py", *TOY_FLAGS, "--cost-limit", cost_limit, "--exp-name", f"limit{cost_limit}",
                   cwd=cwd)
        metrics = read_metrics(only_run_dir(cwd))
        episodes = [r for r in metrics if "charts/episodic_return" in r]
        tail = episodes[-len(episodes) // 5:]
        start_return = np.mean([r["charts/episodic_return"] for r in episodes if r["global_step"] <= LEARNING_STARTS])
        lagrange = max(r.get("charts/lagrange_multiplier", 0.0) for r in metrics)
        return (start_return, np.mean([r["charts/episodic_return"] for r in tail]),
                np.mean([r["charts/episodic_cost"] for r in tail]), lagrange)

    with ThreadPoolExecutor(2) as pool:
        tight, loose = pool.map(train, [5, 1000])
    start_return, last_return, last_cost, max_lagrange = tight
    assert last_return > start_return + 5.0, tight
    assert last_cost <= 5.0 and max_lagrange > 0.0, tight
    start_return, last_return, loose_cost, loose_lagrange = loose
    assert last_return > start_return + 10.0, loose
    assert loose_cost >= 10.0 and loose_lagrange == 0.0, loose  # the limit is what holds the cost down


def test_end_to_end_safety_point_goal_with_checkpoint_evaluation(tmp_path):
    run_script("sac_lagrangian_jax.py", "--env-id", "SafetyPointGoal1-v0", "--total-timesteps", 2000, "--num-envs", 2,
               "--no-async-envs", "--learning-starts", 1000, "--update-interval", 500, "--buffer-size", 10000,
               "--eval-every", 0, "--eval-episodes", 1, "--save-model", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    metrics = read_metrics(run_dir)
    assert metrics[-1]["global_step"] == 2000 and "eval/episodic_return" in metrics[-1]
    logged = set().union(*metrics)
    for name in ["charts/episodic_return", "charts/episodic_cost", "charts/episodic_length", "charts/SPS",
                 "charts/cost_limit", "charts/lagrange_multiplier", "charts/alpha",
                 "losses/critic_reward", "losses/critic_cost", "losses/actor", "losses/alpha"]:
        assert name in logged, name
    checkpoint = run_dir / "checkpoints" / "checkpoint.pkl"
    result = run_script("sac_lagrangian_jax.py", "--eval-checkpoint", checkpoint, "--eval-episodes", 1, cwd=tmp_path)
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["global_step"] == 2000 and np.isfinite(evaluation["eval/episodic_cost"])
    np.testing.assert_allclose(evaluation["eval/episodic_return"], metrics[-1]["eval/episodic_return"], rtol=1e-4)
