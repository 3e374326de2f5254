"""Every Safety-Gymnasium task family and the paper's Bullet-Safety-Gym tasks construct, reset and step under the
pinned stack, through the same import workaround and env construction the algorithm files use."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import cvpo_jax
from tests.helpers import REPO

NAVIGATION_TASKS = [
    "SafetyPointGoal1-v0", "SafetyPointGoal2-v0", "SafetyPointButton1-v0", "SafetyPointPush2-v0",
    "SafetyPointCircle1-v0", "SafetyCarGoal1-v0", "SafetyCarButton2-v0", "SafetyCarCircle1-v0",
    "SafetyRacecarPush1-v0", "SafetyRacecarCircle2-v0", "SafetyDoggoGoal1-v0", "SafetyAntButton1-v0",
    "SafetyAntCircle1-v0",
]
VELOCITY_TASKS = [f"Safety{robot}Velocity-v1" for robot in
                  ["HalfCheetah", "Hopper", "Walker2d", "Swimmer", "Ant", "Humanoid"]]
BULLET_TASKS = [f"Safety{robot}{task}-v0" for task in ["Circle", "Run"] for robot in ["Ball", "Car", "Drone", "Ant"]]


@pytest.mark.parametrize("env_id", NAVIGATION_TASKS + VELOCITY_TASKS + BULLET_TASKS)
def test_task_constructs_resets_and_steps_with_cost(env_id):
    env = cvpo_jax.make_env(env_id, seed=0)()
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape
    for _ in range(10):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and np.all(np.isfinite(obs))
        assert np.isfinite(info["cost"]) and info["cost"] >= 0
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()


@pytest.mark.parametrize("env_id", ["SafetyCarGoal1-v0", "SafetyHopperVelocity-v1"])
def test_async_vector_env_reports_cost(env_id):
    # spawn, not fork: JAX's threads are already running in this process (the scripts fork before JAX starts)
    envs = gym.vector.AsyncVectorEnv([cvpo_jax.make_env(env_id, seed=i) for i in range(2)], context="spawn")
    obs, _ = envs.reset(seed=0)
    assert obs.shape[0] == 2
    for _ in range(5):
        actions = envs.action_space.sample()
        obs, rewards, terminations, truncations, infos = envs.step(actions)
        costs = cvpo_jax.step_costs(infos, 2)
        assert costs.shape == (2,) and np.all(costs >= 0)
    envs.close()


def test_safety_gymnasium_ids_are_recognised():
    assert cvpo_jax.is_safety_gymnasium_id("SafetyPointGoal1-v0")
    assert not cvpo_jax.is_safety_gymnasium_id("SafetyPointGoal1Gymnasium-v0")
    assert not cvpo_jax.is_safety_gymnasium_id("Pendulum-v1")


def test_bullet_safety_gym_ids_are_recognised():
    assert cvpo_jax.is_bullet_safety_gym_id("SafetyCarCircle-v0")
    assert cvpo_jax.is_bullet_safety_gym_id("bullet_safety_gym:SafetyCarCircle-v0")
    assert not cvpo_jax.is_bullet_safety_gym_id("SafetyCarCircle1-v0")
    assert not cvpo_jax.is_bullet_safety_gym_id("Pendulum-v1")
    assert not cvpo_jax.is_safety_gymnasium_id("SafetyCarCircle-v0")


def test_only_bullet_ids_import_bullet_safety_gym_and_only_bullet_envs_load_pybullet():
    code = ("import sys, cvpo_jax; cvpo_jax.make_env('SafetyPointGoal1-v0', seed=0)(); "
            "assert 'bullet_safety_gym' not in sys.modules; "
            "cvpo_jax.make_env('SafetyCarCircle-v0', seed=0); assert 'pybullet' not in sys.modules; "
            "cvpo_jax.make_env('SafetyCarCircle-v0', seed=0)(); assert 'pybullet' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def seeded_observations(env, seed, actions):
    """A seeded reset, the actions, then an unseeded reset (which draws from the env's own generator too)."""
    observations = [env.reset(seed=seed)[0]] + [env.step(action)[0] for action in actions] + [env.reset()[0]]
    return np.array(observations)


@pytest.mark.parametrize("env_id", ["SafetyCarCircle-v0", "SafetyBallRun-v0"])
def test_bullet_seeded_resets_repeat_in_single_envs(env_id):
    env, same_env = cvpo_jax.make_env(env_id, seed=0)(), cvpo_jax.make_env(env_id, seed=0)()
    actions = np.random.default_rng(0).uniform(-1, 1, (20, *env.action_space.shape)).astype(np.float32)
    observations = seeded_observations(env, 5, actions)
    np.random.seed(1)  # what numpy's global generator holds in between must not matter
    assert np.array_equal(observations, seeded_observations(same_env, 5, actions))
    assert not np.allclose(observations[0], seeded_observations(env, 6, actions)[0])


def test_bullet_seeded_resets_repeat_per_env_in_a_sync_vector_env():
    env_id = "SafetyBallRun-v0"  # 100-step episodes: each env resets twice more within the 250 steps
    actions = np.random.default_rng(0).uniform(-1, 1, (250, 2, 2)).astype(np.float32)

    def vector_observations(seed):
        envs = gym.vector.SyncVectorEnv([cvpo_jax.make_env(env_id, seed=i) for i in range(2)])
        observations = [envs.reset(seed=seed)[0]] + [envs.step(step_actions)[0] for step_actions in actions]
        envs.close()
        return np.array(observations)

    observations = vector_observations(0)
    assert np.array_equal(observations, vector_observations(0))
    assert not np.allclose(observations[0], vector_observations(1)[0])
    # The second env (seed 1) draws from its own generator, as it would alone: the first env's resets do not shift it.
    env = cvpo_jax.make_env(env_id, seed=1)()
    alone = [env.reset(seed=1)[0]]
    for action in actions[:, 1]:
        obs, _, terminated, truncated, _ = env.step(action)
        alone.append(env.reset()[0] if terminated or truncated else obs)
    assert np.array_equal(observations[:, 1], np.array(alone))


def test_bullet_env_renders_frames_for_videos():
    env = cvpo_jax.make_env("SafetyBallRun-v0", seed=0, render_mode="rgb_array")()
    env.reset(seed=0)
    frame = env.render()
    assert env.render_mode == "rgb_array" and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
