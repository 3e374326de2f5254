"""ConstrainedSpeed-v0: a cheap constrained task for the learning tests of all three algorithms.

Each of the 20 steps the agent picks a speed in [-1, 1]. The reward is the speed, and a speed
above 0.5 costs 1. The unconstrained optimum (always full speed) earns 20 with cost 20; under an
episodic cost limit d the best policy drives at 0.5 and spends the budget on d fast steps.
Like the Safety-Gymnasium tasks, episodes end by time-limit truncation, never by termination,
and the observation is stationary. The cost is reported in info["cost"], so the scripts load
the task as `--env-id tests.constrained_speed:ConstrainedSpeed-v0`. The test at the end (collected by
pytest, see pyproject.toml) checks these numbers, which the learning tests rely on.
"""

import gymnasium as gym
import numpy as np

EPISODE_LENGTH = 20
FAST_SPEED = 0.5


class ConstrainedSpeedEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None, nan_reward_after=None):
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.render_mode = render_mode
        self.nan_reward_after, self.steps_taken = nan_reward_after, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([1.0, 0.0], dtype=np.float32), {}

    def step(self, action):
        speed = float(np.clip(action[0], -1.0, 1.0))
        cost = float(speed > FAST_SPEED)
        self.steps_taken += 1
        if self.nan_reward_after is not None and self.steps_taken > self.nan_reward_after:
            speed = float("nan")
        return np.array([1.0, 0.0], dtype=np.float32), speed, False, False, {"cost": cost}


gym.register(id="ConstrainedSpeed-v0", entry_point=ConstrainedSpeedEnv, max_episode_steps=EPISODE_LENGTH)
# The same task with a broken reward (NaN from its 300th step on), to test how the scripts stop on NaN.
gym.register(id="BrokenSpeed-v0", entry_point=ConstrainedSpeedEnv, max_episode_steps=EPISODE_LENGTH,
             kwargs={"nan_reward_after": 300})


def test_the_task_pays_and_costs_as_documented():
    def episode(speed, env):
        env.reset(seed=0)
        rewards, costs = [], []
        while True:
            _, reward, terminated, truncated, info = env.step(np.array([speed], np.float32))
            assert not terminated  # episodes end by truncation only
            rewards.append(reward), costs.append(info["cost"])
            if truncated:
                return sum(rewards), sum(costs), len(rewards)

    env = gym.make("ConstrainedSpeed-v0")
    assert episode(1.0, env) == (20.0, 20.0, EPISODE_LENGTH)  # the unconstrained optimum
    assert episode(FAST_SPEED, env) == (10.0, 0.0, EPISODE_LENGTH)  # the fastest free speed
    assert episode(3.0, env)[:2] == (20.0, 20.0)  # actions are clipped to [-1, 1]
    broken = gym.make("BrokenSpeed-v0")
    finite = [episode(0.0, broken)[0] for _ in range(300 // EPISODE_LENGTH)]
    assert np.all(np.isfinite(finite)) and np.isnan(episode(0.0, broken)[0])  # NaN from the 301st step on
