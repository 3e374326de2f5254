import json
import os
import pickle
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from tests.helpers import REPO, TOY_ENV, only_run_dir, read_metrics, run_script, script_command
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
    """The same dual, written independently in float64 and minimised by scipy's SLSQP (lambda unbounded)."""
    q_reward, q_cost = q_reward.astype(np.float64), q_cost.astype(np.float64)

    def dual(x):
        eta, lagrange = x
        scaled = (q_reward - lagrange * q_cost) / eta
        top = scaled.max(axis=1, keepdims=True)
        log_mean_exp = top[:, 0] + np.log(np.mean(np.exp(scaled - top), axis=1))
        return eta * eps_kl + lagrange * eps_cost + eta * np.mean(log_mean_exp)

    result = minimize(dual, [1.0, 0.5], method="SLSQP", bounds=[(1e-6, None), (0.0, None)],
                      options={"ftol": 1e-12, "maxiter": 1000})
    return result.x


def least_cost_in_kl_ball(q_cost, eps_kl):
    """min over q of mean_s E_q[Q_c] s.t. mean_s KL(q || uniform) <= eps_kl, by SLSQP on the weights themselves."""
    batch, samples = q_cost.shape
    q_cost = q_cost.astype(np.float64)

    def weights(z):
        z = z.reshape(batch, samples)
        w = np.exp(z - z.max(axis=1, keepdims=True))
        return w / w.sum(axis=1, keepdims=True)

    kl = lambda z: np.mean(np.sum(weights(z) * np.log(weights(z) * samples + 1e-300), axis=1))
    result = minimize(lambda z: np.mean(np.sum(weights(z) * q_cost, axis=1)), np.zeros(batch * samples),
                      method="SLSQP", constraints=[{"type": "ineq", "fun": lambda z: eps_kl - kl(z)}],
                      options={"ftol": 1e-12, "maxiter": 500})
    return result.fun


def kl_and_cost(logits, q_cost):
    """KL(q || pi_old) over the K samples and E_q[Q_c], averaged over states, in float64."""
    logits = np.asarray(logits, np.float64)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    kl = np.mean(np.sum(weights * np.log(weights * logits.shape[1] + 1e-300), axis=1))
    return kl, np.mean(np.sum(weights * q_cost, axis=1))


SOLVE_ESTEP = jax.jit(cvpo_jax.solve_estep)


def solve(q_reward, q_cost, eps_cost, duals=(1.0, 0.0), tolerance=1e-3):
    duals, _, logits, infeasible, iterations, residual = SOLVE_ESTEP(
        jnp.array(duals, jnp.float32), jnp.ones(()), q_reward, q_cost, EPS_KL, eps_cost, 50, tolerance, 1e-6, 1e5)
    kl, cost = kl_and_cost(logits, q_cost)
    return np.asarray(duals, np.float64), bool(infeasible), kl, cost, int(iterations), float(residual)


def test_estep_dual_derivatives_match_autodiff_and_the_constraint_slacks():
    q_reward, q_cost = q_values(3, 1.0, batch=32)
    for duals in ([0.7, 0.0], [2.0, 1.5], [30.0, 40.0]):
        duals = jnp.array(duals)
        value, gradient, hessian = cvpo_jax.estep_dual_derivatives(duals, q_reward, q_cost, EPS_KL, 0.9)
        dual = lambda d: cvpo_jax.estep_dual(d, q_reward, q_cost, EPS_KL, 0.9)
        np.testing.assert_allclose(value, dual(duals), rtol=1e-5)
        np.testing.assert_allclose(gradient, jax.grad(dual)(duals), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(hessian, jax.hessian(dual)(duals), rtol=2e-3, atol=1e-6)
        kl, cost = kl_and_cost((q_reward - float(duals[1]) * q_cost) / float(duals[0]), q_cost)
        np.testing.assert_allclose(gradient, [EPS_KL - kl, 0.9 - cost], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("correlation, eps_cost", [(2.0, 0.95), (1.0, 0.97), (0.5, 1.2), (1.0, 2.0)])
def test_estep_dual_matches_slsqp_and_satisfies_both_bounds(correlation, eps_cost):
    q_reward, q_cost = q_values(0, correlation)
    reference_eta, reference_lagrange = slsqp_duals(q_reward, q_cost, EPS_KL, eps_cost)
    for start in [(1.0, 0.0), (20.0, 20.0), (1e-3, 1e5), (300.0, 0.0)]:  # cold and warm starts, good and bad
        (eta, lagrange), infeasible, kl, cost, iterations, residual = solve(q_reward, q_cost, eps_cost, start)
        assert not infeasible and residual <= 1e-3 and iterations < 50
        np.testing.assert_allclose(eta, reference_eta, rtol=1e-2)
        np.testing.assert_allclose(lagrange, reference_lagrange, rtol=1e-2, atol=1e-3)
        np.testing.assert_allclose(kl, EPS_KL, rtol=1e-2)  # the KL bound binds at an interior eta
        assert cost <= eps_cost * 1.001
        if reference_lagrange > 1e-3:  # the cost constraint binds: the cost sits on the bound
            np.testing.assert_allclose(cost, eps_cost, rtol=1e-3)
        else:
            assert lagrange == 0.0


def test_estep_covers_both_regimes():
    assert slsqp_duals(*q_values(0, 2.0), EPS_KL, 0.95)[1] > 1.0  # (2.0, 0.95) above binds the cost
    assert slsqp_duals(*q_values(0, 0.5), EPS_KL, 1.2)[1] < 1e-4  # (0.5, 1.2) above leaves it slack


@pytest.mark.parametrize("eps_cost", [0.5, 0.0])
def test_infeasible_estep_minimises_the_cost_inside_the_kl_ball(eps_cost):
    q_reward, q_cost = q_values(1, 1.0, batch=8)
    least_cost = least_cost_in_kl_ball(q_cost, EPS_KL)
    assert least_cost > eps_cost + 0.1  # no q inside the ball meets the bound
    for start in [(1.0, 0.0), (5.0, 50.0)]:
        _, infeasible, kl, cost, _, residual = solve(q_reward, q_cost, eps_cost, start)
        assert infeasible and residual <= 1e-3
        assert kl <= EPS_KL * 1.01
        np.testing.assert_allclose(cost, least_cost, rtol=1e-3)


def test_estep_solver_converges_on_random_problems():
    rng = np.random.default_rng(5)
    for trial in range(30):
        scale_reward, scale_cost = 10.0 ** rng.uniform(-3, 2, size=2)
        q_reward = (rng.normal(size=(64, 16)) * scale_reward + rng.normal(size=(64, 1)) * 50).astype(np.float32)
        q_cost = np.abs(rng.normal(size=(64, 16)) * scale_cost + rng.uniform(0, 40)).astype(np.float32)
        q_cost[: rng.integers(0, 64)] = q_cost[:, :1].mean()  # some states where every action costs the same
        eps_cost = float(np.quantile(q_cost.mean(axis=1), rng.uniform(0, 1)))
        start = 10.0 ** rng.uniform(-4, 5, size=2)
        _, infeasible, kl, cost, iterations, residual = solve(q_reward, q_cost, eps_cost, start)
        assert residual <= 1e-3 and kl <= EPS_KL * 1.01, (trial, residual, kl)
        if not infeasible:
            assert cost <= eps_cost + 1e-3 * max(eps_cost, q_cost.std(axis=1).mean()) + 1e-6


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
    floored_mean, _ = cvpo_jax.decoupled_gaussian_kl(mean_old, std_old, mean, std, std_floor=0.5)
    np.testing.assert_allclose(floored_mean, np.mean(gaussian_kl(mean_old, np.maximum(std_old, 0.5), mean,
                                                                 np.maximum(std_old, 0.5))), rtol=1e-5)
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


class KnownCritic(nn.Module):
    """Q_r(s, a) = scale a_0 and Q_c(s, a) = scale (s_1 + a_0^2), stacked like CriticEnsemble with one critic each.
    Its one parameter tells the online critic (scale 1) from the target (scale 3) in the wiring tests."""

    @nn.compact
    def __call__(self, obs, action):
        scale = self.param("scale", nn.initializers.ones, ())
        return scale * jnp.stack([action[..., 0] + 0 * obs[..., 0], obs[..., 1] + action[..., 0] ** 2])


def known_setup(eps_cost, obs_offset=0.0, **flags):
    """CVPO's real update functions on KnownCritic, with the current actor's mean 3 away from pi_old's."""
    args = cvpo_jax.Args(**{"double_critic": False, "num_sampled_actions": 64, "estep_dual_max": 1e5,
                            "hidden_sizes": (16, 16), **flags})
    actor = cvpo_jax.Actor(1, (16, 16))
    updates = cvpo_jax.make_train_round(args, actor, KnownCritic(), np.array([-100.0]), np.array([100.0]), eps_cost)
    state = updates.init_state(jax.random.PRNGKey(0), 2, 1)
    shifted = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 3.0 if "Dense_2" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)
        else x, state.old_actor_params)
    state = state.replace(actor=state.actor.replace(params=shifted),
                          target_critic_params=jax.tree.map(lambda x: 3.0 * x, state.critic.params))
    obs = jnp.asarray(np.stack([np.linspace(-1, 1, 32), np.full(32, obs_offset)], axis=1), jnp.float32)
    return args, actor, updates, state, obs


def pi_old_cost(actor, state, obs):
    mean, std = actor.apply(state.old_actor_params, obs)
    return float(jnp.mean(obs[:, 1] + mean[:, 0] ** 2 + std[:, 0] ** 2))


class ConstantCritics(nn.Module):
    """Two reward critics then two cost critics, each a constant Q_i(s, a) = value_i, stacked like CriticEnsemble."""

    critics_per_signal = 2

    @nn.compact
    def __call__(self, obs, action):
        value = self.param("value", nn.initializers.zeros, (4,))
        return value.reshape((4,) + (1,) * (obs.ndim - 1)) + 0 * obs[..., 0] + 0 * action[..., 0]


def test_twin_reward_critics_share_the_min_target_and_each_cost_critic_bootstraps_on_its_own():
    args = cvpo_jax.Args(double_critic=True, hidden_sizes=(16, 16))
    updates = cvpo_jax.make_train_round(args, cvpo_jax.Actor(1, (16, 16)), ConstantCritics(), np.array([-1.0]),
                                        np.array([1.0]), 1.0)
    state = updates.init_state(jax.random.PRNGKey(0), 2, 1)
    online, target = jnp.full(4, 5.0), jnp.array([0.0, 10.0, 0.0, 10.0])  # online critics in between their targets
    state = state.replace(critic=state.critic.replace(params={"params": {"value": online}}),
                          target_critic_params={"params": {"value": target}})
    batch = {"obs": jnp.zeros((8, 2)), "actions": jnp.zeros((8, 1)), "bootstrap_obs": jnp.zeros((8, 2)),
             "reward_return": jnp.zeros(8), "cost_return": jnp.zeros(8), "bootstrap_discount": jnp.ones(8)}
    state, _ = jax.jit(updates.update_critics)(state, batch, jax.random.PRNGKey(1))
    moved = np.sign(np.asarray(state.critic.params["params"]["value"]) - 5.0)
    # reward: both move to min(0, 10) = 0; cost: the first to its own 0, the second to its own 10 (a shared max
    # target would move both up, a shared min both down)
    np.testing.assert_array_equal(moved, [-1, -1, -1, 1])


def test_estep_takes_the_min_of_the_reward_critics_and_the_max_of_the_cost_critics():
    args = cvpo_jax.Args(double_critic=True, hidden_sizes=(16, 16), estep_dual_max=1e5)
    updates = cvpo_jax.make_train_round(args, cvpo_jax.Actor(1, (16, 16)), ConstantCritics(), np.array([-1.0]),
                                        np.array([1.0]), 10.0)
    state = updates.init_state(jax.random.PRNGKey(0), 2, 1)
    state = state.replace(critic=state.critic.replace(params={"params": {"value": jnp.array([1.0, 3.0, 2.0, 7.0])}}),
                          target_critic_params={"params": {"value": jnp.full(4, 100.0)}})
    _, _, weights, metrics = jax.jit(updates.estep)(state, jnp.zeros((8, 2)), jax.random.PRNGKey(1))
    np.testing.assert_allclose(weights, 1 / args.num_sampled_actions, rtol=1e-5)  # every action alike: q = pi_old
    np.testing.assert_allclose(metrics["estep/q_reward"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["estep/q_cost_pi_old"], 7.0, rtol=1e-5)  # the pessimistic cost critic


def test_estep_samples_pi_old_weighs_with_the_online_critics_and_meets_both_bounds():
    _, actor, _, state, obs = known_setup(0.0)
    eps_cost = 0.8 * pi_old_cost(actor, state, obs)  # the reward pulls a_0 up, the cost bound holds it back
    _, actor, updates, state, obs = known_setup(eps_cost)
    _, sampled, weights, metrics = jax.jit(updates.estep)(state, obs, jax.random.PRNGKey(1))
    mean_old, std_old = actor.apply(state.old_actor_params, obs)
    standardised = np.asarray((sampled - mean_old[:, None]) / std_old[:, None])
    assert abs(standardised.mean()) < 0.1 and abs(standardised.std() - 1) < 0.1  # K samples from pi_old
    eta, lagrange = float(metrics["charts/estep_eta"]), float(metrics["charts/estep_lambda"])
    q_reward, q_cost = np.asarray(sampled[..., 0]), np.asarray(obs[:, None, 1] + sampled[..., 0] ** 2)
    expected = np.exp((q_reward - lagrange * q_cost) / eta - ((q_reward - lagrange * q_cost) / eta).max(1, keepdims=True))
    np.testing.assert_allclose(weights, expected / expected.sum(1, keepdims=True), rtol=1e-3, atol=1e-7)
    kl, cost = kl_and_cost((q_reward - lagrange * q_cost) / eta, q_cost)
    assert lagrange > 0.01 and float(metrics["estep/infeasible"]) == 0.0
    np.testing.assert_allclose(kl, EPS_KL, rtol=1e-2)
    np.testing.assert_allclose(cost, eps_cost, rtol=2e-3)


def test_infeasible_estep_stays_inside_the_kl_ball():
    _, actor, updates, state, obs = known_setup(0.5, obs_offset=1.0, num_sampled_actions=16)  # Q_c >= 1 > 0.5
    obs = obs[:8]
    state = state.replace(duals=jnp.array([0.01, 50.0]))  # a poor warm start
    _, sampled, weights, metrics = jax.jit(updates.estep)(state, obs, jax.random.PRNGKey(2))
    q_cost = np.asarray(obs[:, None, 1] + sampled[..., 0] ** 2, np.float64)
    kl, cost = kl_and_cost(np.log(np.asarray(weights, np.float64) + 1e-300), q_cost)
    assert float(metrics["estep/infeasible"]) == 1.0
    assert kl <= EPS_KL * 1.01
    least_cost = np.exp(-q_cost / float(metrics["estep/cost_temperature"]))
    np.testing.assert_allclose(weights, least_cost / least_cost.sum(1, keepdims=True), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(cost, least_cost_in_kl_ball(q_cost, EPS_KL), rtol=2e-3)


@pytest.mark.parametrize("actor_lr, alpha_moves", [(0.05, "up"), (1e-7, "down")])
def test_mstep_holds_its_trust_region_and_moves_its_multipliers_the_right_way(actor_lr, alpha_moves):
    args, actor, updates, state, obs = known_setup(1.0, actor_lr=actor_lr)
    state = state.replace(actor=state.actor.replace(params=state.old_actor_params))
    mean_old, std_old = actor.apply(state.old_actor_params, obs)
    sampled = mean_old[:, None] + std_old[:, None] * jax.random.normal(jax.random.PRNGKey(3), (32, 16, 1))
    weights = jax.nn.one_hot(jnp.argmax(sampled[..., 0], axis=1), 16)  # q far from pi_old: a strong pull
    new_state, metrics = jax.jit(updates.mstep)(state, obs, sampled, weights)
    kl_mean, kl_std = cvpo_jax.decoupled_gaussian_kl(mean_old, std_old, *actor.apply(new_state.actor.params, obs),
                                                      std_floor=args.mstep_kl_std_floor)
    assert kl_mean <= 0.005 * (1 + 1e-4) and kl_std <= 0.0005 * (1 + 1e-4)
    moved = np.asarray(new_state.mstep_log_alphas - state.mstep_log_alphas)
    if alpha_moves == "up":  # the full step would leave the trust region: it was cut, the multipliers rise
        assert float(metrics["mstep/step_fraction"]) < 1 and np.all(moved > 0)
    else:
        assert float(metrics["mstep/step_fraction"]) == 1 and np.all(moved < 0)


def test_train_round_keeps_the_multipliers_and_refreshes_pi_old_after_the_round():
    args, actor, updates, state, obs = known_setup(1.0, actor_lr=0.05)
    state = state.replace(actor=state.actor.replace(params=state.old_actor_params),
                          mstep_log_alphas=jnp.log(jnp.array([7.0, 7.0])))
    updates_in_round = 3
    batches = {"obs": jnp.broadcast_to(obs, (updates_in_round, *obs.shape)),
               "actions": jnp.zeros((updates_in_round, 32, 1)), "reward_return": jnp.zeros((updates_in_round, 32)),
               "cost_return": jnp.zeros((updates_in_round, 32)),
               "bootstrap_obs": jnp.broadcast_to(obs, (updates_in_round, *obs.shape)),
               "bootstrap_discount": jnp.zeros((updates_in_round, 32)),
               "policy_obs": jnp.broadcast_to(obs, (updates_in_round, *obs.shape))}
    new_state, metrics = updates.train_round(state, batches, jax.random.PRNGKey(4))
    np.testing.assert_allclose(np.exp(new_state.mstep_log_alphas), 7.0,
                               rtol=np.exp(updates_in_round * args.mstep_dual_lr) - 1 + 1e-6)  # not reset
    assert float(metrics["mstep/kl_mu"]) > 0  # pi_old stays fixed during the round, so the actor drifts from it
    for old, new in zip(jax.tree.leaves(new_state.old_actor_params), jax.tree.leaves(new_state.actor.params)):
        np.testing.assert_array_equal(old, new)  # pi_old <- the updated actor after the round
    assert not np.allclose(jax.tree.leaves(new_state.actor.params)[0], jax.tree.leaves(state.actor.params)[0])


def test_bounded_mean_stays_in_the_widened_box_and_is_the_identity_at_its_centre():
    low, high = np.array([-1.0, 0.0, -np.inf], np.float32), np.array([1.0, 4.0, np.inf], np.float32)
    bounded = cvpo_jax.Actor(3, (16,), *cvpo_jax.mean_bounds(low, high, 1.5))
    unbounded = cvpo_jax.Actor(3, (16,))
    params = jax.tree.map(lambda x: 50.0 * x, unbounded.init(jax.random.PRNGKey(0), jnp.zeros((1, 4))))
    obs = 10.0 * jax.random.normal(jax.random.PRNGKey(1), (256, 4))
    mean, raw_mean = bounded.apply(params, obs)[0], unbounded.apply(params, obs)[0]
    assert np.abs(raw_mean[:, :2]).max() > 100  # the raw means reach far outside the box
    assert np.all(np.abs(mean[:, 0]) <= 1.5) and np.all((-1.0 <= mean[:, 1]) & (mean[:, 1] <= 5.0))
    np.testing.assert_array_equal(mean[:, 2], raw_mean[:, 2])  # an infinite box leaves its dimension unbounded
    assert np.abs(mean[:, 0]).max() > 1.4 and mean[:, 1].max() > 4.8  # and the bounds are reached
    # near the centre the squash is the identity, so small means learn as before
    centre = jnp.array([0.0, 2.0, 0.0])
    small = jax.tree.map(lambda x: x / 5000.0, params)
    np.testing.assert_allclose(bounded.apply(small, obs)[0], centre + unbounded.apply(small, obs)[0], atol=1e-4)
    assert cvpo_jax.mean_bounds(low, high, 0.0) == ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))


class SaturatingCritic(nn.Module):
    """Q_r(s, a) = a_0 and Q_c = 0, stacked like a CriticEnsemble of one critic per signal; the E-step feeds it clipped
    actions, so the reward stops rising at the box's edge a_0 = 1."""

    @nn.compact
    def __call__(self, obs, action):
        self.param("unused", nn.initializers.zeros, ())
        return jnp.stack([action[..., 0] + 0 * obs[..., 0], jnp.zeros(action.shape[:-1])])


@pytest.mark.parametrize("mean_bound", [0.0, 1.5])
def test_a_saturating_reward_drives_an_unbounded_mean_out_of_the_box_and_a_bounded_one_to_its_edge(mean_bound):
    """Samples beyond the edge all clip to it and share its value, those inside lose: q's mean lies beyond pi_old's
    until every sample clips, so an unbounded mean runs out of the box with sigma shrinking behind it (the mechanism
    of the one M-step breach in the Bullet runs); the bounded mean stops at its bound, past the edge it must reach."""
    args = cvpo_jax.Args(num_sampled_actions=16, hidden_sizes=(16, 16), estep_dual_max=1e5, actor_lr=0.01,
                         mean_bound=mean_bound, double_critic=False)
    low, high = np.array([-1.0], np.float32), np.array([1.0], np.float32)
    actor = cvpo_jax.Actor(1, (16, 16), *cvpo_jax.mean_bounds(low, high, mean_bound))
    updates = cvpo_jax.make_train_round(args, actor, SaturatingCritic(), low, high, 1.0)
    state = updates.init_state(jax.random.PRNGKey(0), 2, 1)
    obs = jax.random.uniform(jax.random.PRNGKey(1), (64, 2), minval=-1, maxval=1)
    updates_in_round = 25
    zeros = jnp.zeros((updates_in_round, 64))
    batches = {"obs": jnp.broadcast_to(obs, (updates_in_round, 64, 2)), "actions": zeros[..., None],
               "reward_return": zeros, "cost_return": zeros, "bootstrap_discount": zeros,
               "bootstrap_obs": jnp.broadcast_to(obs, (updates_in_round, 64, 2)),
               "policy_obs": jnp.broadcast_to(obs, (updates_in_round, 64, 2))}
    for round_index in range(60):
        state, metrics = updates.train_round(state, batches, jax.random.PRNGKey(10 + round_index))
        assert float(metrics["mstep/kl_mu_max"]) <= args.mstep_kl_mu * (1 + 1e-4)
    mean = np.asarray(actor.apply(state.actor.params, obs)[0][:, 0])
    if mean_bound:
        assert np.all(mean <= 1.5) and np.mean(mean) > 1.0
    else:
        assert np.mean(mean) > 1.8  # 2.2 here, and still rising


def test_cost_threshold_is_the_discounted_cost_the_critic_estimates():
    """A cost of d / T at every step of truncated T-step episodes: the cost critic, bootstrapping through the
    truncations, converges to the threshold d / ((1 - gamma) T)."""
    d, gamma, length = 5.0, 0.9, 20
    args = cvpo_jax.Args(gamma=gamma, n_step=1, hidden_sizes=(16, 16), critic_lr=3e-3, batch_size=64,
                         double_critic=False, estep_dual_max=1e5)
    actor, critic = cvpo_jax.Actor(1, (16, 16)), cvpo_jax.CriticEnsemble((16, 16), 1)
    eps_cost = cvpo_jax.cost_threshold(d, gamma, length)
    updates = cvpo_jax.make_train_round(args, actor, critic, np.array([-1.0]), np.array([1.0]), eps_cost)
    state = updates.init_state(jax.random.PRNGKey(0), 2, 1)
    buffer, rng = cvpo_jax.ReplayBuffer(4000, 2, 2, 1), np.random.default_rng(0)
    for t in range(2000):
        obs = np.tile([1.0, 0.0], (2, 1))
        buffer.add(obs=obs, actions=rng.uniform(-1, 1, (2, 1)), rewards=np.zeros(2), costs=np.full(2, d / length),
                   next_obs=obs, terminated=np.zeros(2, bool), episode_ended=np.full(2, t % length == length - 1))
    for round_index in range(10):
        batches = buffer.sample_n_step(rng, (200, args.batch_size), args.n_step, gamma)
        batches["policy_obs"] = batches["obs"]
        state, metrics = updates.train_round(state, batches, jax.random.PRNGKey(round_index))
    q_cost = critic.apply(state.critic.params, jnp.ones((16, 2)) * jnp.array([1.0, 0.0]), jnp.linspace(-1, 1, 16)[:, None])[1]
    np.testing.assert_allclose(q_cost, eps_cost, rtol=0.03)
    np.testing.assert_allclose(eps_cost, d / length / (1 - gamma))
    assert cvpo_jax.cost_threshold(0.0, gamma, length) == 0.0


def test_discounted_cost_to_go_matches_a_plain_loop():
    gamma, rng = 0.9, np.random.default_rng(4)
    costs = rng.integers(0, 2, size=(30, 2)).astype(float)
    ended = np.zeros((30, 2), bool)
    ended[[9, 19], 0], ended[[14], 1] = True, True
    terminated = np.zeros((30, 2), bool)
    terminated[19, 0] = True
    values = cvpo_jax.discounted_cost_to_go(costs, ended, terminated, gamma)
    for env, episodes in ((0, [(0, 9, False), (10, 19, True)]), (1, [(0, 14, False)])):
        for start, end, was_terminated in episodes:
            tail = 0.0 if was_terminated else costs[start:end + 1, env].mean() / (1 - gamma)
            for t in range(start, end + 1):
                expected = sum(gamma ** (k - t) * costs[k, env] for k in range(t, end + 1)) + gamma ** (end + 1 - t) * tail
                np.testing.assert_allclose(values[t, env], expected)
    assert np.isnan(values[20:, 0]).all() and np.isnan(values[15:, 1]).all()  # episodes still running
    constant = cvpo_jax.discounted_cost_to_go(np.full((20, 1), 0.25), np.arange(20)[:, None] == 19,
                                              np.zeros((20, 1), bool), gamma)
    np.testing.assert_allclose(constant, 0.25 / (1 - gamma))  # what the critics estimate for a constant cost


def test_resume_ends_the_interrupted_episodes_in_the_buffer():
    buffer = cvpo_jax.ReplayBuffer(capacity=20, num_envs=1, obs_dim=1, action_dim=1)
    add = lambda t: buffer.add(obs=[[t]], actions=[[0.0]], rewards=[1.0], costs=[0.0], next_obs=[[t + 1]],
                               terminated=[False], episode_ended=[False])
    for t in range(5):
        add(t)
    buffer.mark_newest_episode_end()  # what --resume does: the envs restart their episodes
    for t in range(100, 103):
        add(t)
    batch = buffer.sample_n_step(np.random.default_rng(0), (200,), 3, 0.5)
    last_before = batch["obs"][:, 0] == 4
    assert last_before.any()
    np.testing.assert_allclose(batch["reward_return"][last_before], 1.0)  # its own step only
    np.testing.assert_allclose(batch["bootstrap_obs"][last_before, 0], 5.0)  # bootstraps from its true next state


def test_policy_states_come_from_the_newest_rows_only():
    buffer = cvpo_jax.ReplayBuffer(capacity=20, num_envs=2, obs_dim=2, action_dim=1)  # 10 rows: wraps
    for t in range(23):
        buffer.add(obs=[[t, 0], [t, 1]], actions=np.zeros((2, 1)), rewards=np.zeros(2), costs=np.zeros(2),
                   next_obs=np.zeros((2, 2)), terminated=np.zeros(2, bool), episode_ended=np.zeros(2, bool))
    obs = buffer.sample_recent_obs(np.random.default_rng(0), (50, 20), rows=4)
    assert set(map(tuple, obs.reshape(-1, 2).astype(int))) == {(t, env) for t in range(19, 23) for env in (0, 1)}
    whole = buffer.sample_recent_obs(np.random.default_rng(0), (2000,), rows=100)  # at most the whole buffer
    assert set(whole[:, 0].astype(int)) == set(range(13, 23))


def test_train_round_takes_the_estep_and_mstep_states_from_policy_obs():
    _, actor, updates, state, obs = known_setup(1.0)
    replay_obs = obs.at[:, 1].set(0.0)  # Q_c = s_1 + a_0^2: 5 higher on the policy's states
    policy_obs = obs.at[:, 1].set(5.0)
    updates_in_round = 2
    stacked = lambda x: jnp.broadcast_to(x, (updates_in_round, *x.shape))
    batches = {"obs": stacked(replay_obs), "actions": jnp.zeros((updates_in_round, 32, 1)),
               "reward_return": jnp.zeros((updates_in_round, 32)), "cost_return": jnp.zeros((updates_in_round, 32)),
               "bootstrap_obs": stacked(replay_obs), "bootstrap_discount": jnp.zeros((updates_in_round, 32)),
               "policy_obs": stacked(policy_obs)}
    _, metrics = updates.train_round(state, batches, jax.random.PRNGKey(5))
    np.testing.assert_allclose(metrics["estep/q_cost_pi_old"], pi_old_cost(actor, state, policy_obs), rtol=0.1)
    assert pi_old_cost(actor, state, policy_obs) > 2 * pi_old_cost(actor, state, replay_obs)


def test_interrupt_during_a_round_saves_a_state_and_step_that_agree(tmp_path):
    """Rounds of 1000 updates dominate the run's time, so the SIGINT almost surely lands inside one."""
    flags = ["--env-id", TOY_ENV, "--num-envs", 2, "--no-async-envs", "--learning-starts", 200,
             "--update-interval", 200, "--updates-per-step", 5, "--batch-size", 32, "--hidden-sizes", 16, 16,
             "--eval-every", 0, "--total-timesteps", 1_000_000]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    process = subprocess.Popen(script_command("cvpo_jax.py", *flags), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        metrics_files = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if metrics_files and sum("estep/kl_q_pi_old" in line for line in open(metrics_files[0])) >= 2:
            break
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    match = re.search(r"interrupted at global step (\d+); resume with --resume (\S+)", stderr)
    assert match, stderr[-2000:]
    with open(tmp_path / match.group(2), "rb") as file:
        saved = pickle.load(file)
    rounds_done = (saved["global_step"] - 200) // 200 + 1
    assert saved["state"]["actor"]["step"] == 1000 * rounds_done


def test_the_first_update_comes_after_the_first_round_by_default(tmp_path):
    # FSRL updates after its first collect of 10 episodes; a fixed warm-up of 10,000 steps was 50 episodes of the
    # 200-step Bullet tasks acted by the untrained actor. The toy task's episodes are 20 steps: rounds of 200.
    run_script("cvpo_jax.py", "--env-id", TOY_ENV, "--num-envs", 2, "--no-async-envs", "--batch-size", 32,
               "--hidden-sizes", 16, "--eval-every", 0, "--eval-episodes", 1, "--total-timesteps", 600, cwd=tmp_path)
    rounds = [r["global_step"] for r in read_metrics(only_run_dir(tmp_path)) if "estep/kl_q_pi_old" in r]
    assert rounds == [200, 400, 600]


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
    training = run_script("cvpo_jax.py", "--env-id", "SafetyPointGoal1-v0", "--total-timesteps", 2000,
                          "--num-envs", 2, "--learning-starts", 1000, "--update-interval", 500, "--buffer-size", 10000,
                          "--eval-every", 0, "--eval-episodes", 1, "--save-model", "--progress-every", 1, cwd=tmp_path)
    assert re.search(r"^global step [\d,]+/2,000: [\d,]+ steps/s, ", training.stdout, re.M)  # stdout is no terminal
    run_dir = only_run_dir(tmp_path)
    metrics = read_metrics(run_dir)
    assert metrics[-1]["global_step"] == 2000 and "eval/episodic_return" in metrics[-1]
    assert any("charts/estep_eta" in r for r in metrics)
    checkpoint = run_dir / "checkpoints" / "checkpoint.pkl"
    with open(checkpoint, "rb") as file:
        assert pickle.load(file)["args"]["policy_state_window"] == 500  # the default: one round
    result = run_script("cvpo_jax.py", "--eval-checkpoint", checkpoint, "--eval-episodes", 1, cwd=tmp_path)
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["global_step"] == 2000 and np.isfinite(evaluation["eval/episodic_cost"])
    np.testing.assert_allclose(evaluation["eval/episodic_return"], metrics[-1]["eval/episodic_return"], rtol=1e-4)


def test_resume_keeps_the_checkpoints_mean_bound_and_critics_and_an_old_checkpoint_keeps_its_own():
    stored = vars(cvpo_jax.Args(mean_bound=2.0, double_critic=True, total_timesteps=1000))
    cli = cvpo_jax.Args(resume="checkpoint.pkl", mean_bound=1.0, double_critic=False, total_timesteps=5000)
    resumed = cvpo_jax.args_from_checkpoint({"args": stored}, cli)
    assert resumed.mean_bound == 2.0 and resumed.double_critic and resumed.total_timesteps == 5000
    assert resumed.resume == "checkpoint.pkl"
    from_before_the_flags = {k: v for k, v in stored.items() if k not in ("mean_bound", "double_critic")}
    resumed_old = cvpo_jax.args_from_checkpoint({"args": from_before_the_flags}, cvpo_jax.Args(resume="c.pkl"))
    assert resumed_old.mean_bound == 0.0 and not resumed_old.double_critic  # unbounded, one critic per signal


def test_policy_state_window_beyond_the_buffer_is_refused(tmp_path):
    result = run_script("cvpo_jax.py", "--buffer-size", 1000, "--policy-state-window", 2000, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: --policy-state-window must be at most --buffer-size (1000), got 2000"


@pytest.mark.parametrize("mean_bound", ["0.5", "inf"])
def test_a_mean_bound_below_one_or_infinite_is_refused(tmp_path, mean_bound):
    result = run_script("cvpo_jax.py", "--mean-bound", mean_bound, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == ("error: --mean-bound must be 0 (unbounded) or a finite number of at least 1 "
                                     f"(the box itself), got {float(mean_bound)}")
