"""Every Safety-Gymnasium task family constructs, resets and steps under the pinned stack,
through the same import workaround and env construction the algorithm files use."""

import gymnasium as gym
import numpy as np
import pytest

import cvpo_jax

NAVIGATION_TASKS = [
    "SafetyPointGoal1-v0", "SafetyPointGoal2-v0", "SafetyPointButton1-v0", "SafetyPointPush2-v0",
    "SafetyPointCircle1-v0", "SafetyCarGoal1-v0", "SafetyCarButton2-v0", "SafetyCarCircle1-v0",
    "SafetyRacecarPush1-v0", "SafetyRacecarCircle2-v0", "SafetyDoggoGoal1-v0", "SafetyAntButton1-v0",
    "SafetyAntCircle1-v0",
]
VELOCITY_TASKS = [f"Safety{robot}Velocity-v1" for robot in
                  ["HalfCheetah", "Hopper", "Walker2d", "Swimmer", "Ant", "Humanoid"]]


@pytest.mark.parametrize("env_id", NAVIGATION_TASKS + VELOCITY_TASKS)
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
