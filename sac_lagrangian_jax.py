# SAC-Lagrangian: Soft Actor-Critic (Haarnoja et al. 2018, arXiv:1812.05905) with a Lagrange multiplier on
# the episodic cost, set by a PID controller (Stooke, Achiam, Abbeel, ICML 2020, arXiv:2007.03964) with FSRL's gains,
# or by gradient ascent. Docs: README.md, section "sac_lagrangian_jax.py". One file, every update jitted.
import contextlib
import dataclasses
import difflib
import io
import json
import os
import pickle
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np


def import_safety_gymnasium():
    """Import safety_gymnasium 1.0.0 (the last PyPI release) on Python >= 3.11.

    Its asset dataclasses use numpy arrays as field defaults, which Python 3.11 rejects
    ("mutable default ... use default_factory"). While it imports, such defaults become
    default_factory fields; upstream fixed this after 1.0.0. The import also prints a notice about
    gymnasium-robotics' Adroit tasks, which this project does not use; it is silenced.
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
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import mujoco
            import safety_gymnasium
    except ImportError as error:
        sys.exit(f"error: {error.name} is missing; install the pinned stack with: pip install --no-deps -r requirements.txt")
    finally:
        dataclasses.dataclass = original_dataclass
    if not (np.__version__.startswith("1.") and mujoco.__version__ == "2.3.3"):
        sys.exit(
            f"error: safety-gymnasium needs numpy 1.x and mujoco 2.3.3 (found numpy {np.__version__}, mujoco "
            f"{mujoco.__version__}); install the pinned stack with: pip install --no-deps -r requirements.txt"
        )
    return safety_gymnasium


safety_gymnasium = import_safety_gymnasium()
import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import gymnasium as gym  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import tyro  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402
from tqdm import tqdm  # noqa: E402


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (one seed reproduces a run on the same machine)"""
    track: bool = False
    """log to Weights & Biases (offline when no wandb login is found)"""
    wandb_project_name: str = "safe-rl-jax"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """record the evaluation episodes to runs/{run_name}/videos (headless: set MUJOCO_GL)"""
    save_model: bool = False
    """write checkpoints to runs/{run_name}/checkpoints every --checkpoint-every steps and at the end"""
    checkpoint_every: int = 100_000
    """env steps between checkpoints (with --save-model)"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from, with the configuration saved in it"""
    progress_every: float = 60.0
    """seconds between progress lines when stdout is not a terminal (a terminal shows a progress bar)"""
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint for --eval-episodes episodes instead of training"""
    eval_every: int = 100_000
    """env steps between evaluations of the deterministic policy (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    env_id: str = "SafetyPointGoal1-v0"
    """a Safety-Gymnasium or Bullet-Safety-Gym id, or a Gymnasium id (also `module:Env-v0`) that reports info["cost"]"""
    total_timesteps: int = 1_000_000
    """env steps summed over all envs"""
    num_envs: int = 4
    """parallel envs"""
    async_envs: bool = True
    """step the envs in subprocesses (--no-async-envs for cheap envs)"""
    cost_limit: float = 25.0
    """episodic cost budget d"""

    # Algorithm specific arguments
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 3
    """steps in the TD targets of both critics (the entropy bonus enters only at the bootstrap state)"""
    tau: float = 0.05
    """Polyak rate of the target critics"""
    buffer_size: int = 200_000
    """replay buffer capacity in transitions"""
    batch_size: int = 256
    """states per gradient update"""
    learning_starts: int = 10_000
    """env steps collected before the first update"""
    updates_per_step: float = 0.2
    """gradient updates per env step"""
    update_interval: int = 2_000
    """env steps per round; a round updates the multiplier, then runs its gradient updates in one jitted scan"""
    overlap_learning: bool = False
    """learn each round while the envs collect the next with the last finished actor (acting lags one round)"""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """hidden layers of the actor and of each critic"""
    actor_lr: float = 5e-4
    """learning rate of the actor"""
    critic_lr: float = 1e-3
    """learning rate of the critics"""
    alpha_lr: float = 3e-4
    """learning rate of log(alpha), the entropy temperature (target entropy -|A|)"""
    initial_alpha: float = 1.0
    """entropy temperature before the first update"""
    lagrangian_method: Literal["pid", "gradient"] = "pid"
    """how lambda follows the mean cost of the episodes finished since the last round: pid controller or Adam"""
    pid_kp: float = 0.05
    """proportional gain of the PID multiplier"""
    pid_ki: float = 0.0005
    """integral gain of the PID multiplier"""
    pid_kd: float = 0.1
    """derivative gain of the PID multiplier (on rises of the smoothed cost only)"""
    pid_cost_smoothing: float = 0.95
    """per-episode EMA factor of the episodic cost seen by the P and D terms (0: the raw cost, as FSRL)"""
    lagrange_lr: float = 0.05
    """Adam rate of the gradient multiplier (one step per round with finished episodes)"""


# Flags that may differ between a run and its resumption; every other flag comes from the checkpoint.
SESSION_FLAGS = ("total_timesteps", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model",
                 "checkpoint_every", "eval_every", "eval_episodes", "async_envs",
                 "progress_every")


def fail(message):
    sys.exit(f"error: {message}")


def is_safety_gymnasium_id(env_id):
    return env_id in safety_gymnasium.utils.registration.safe_registry


def register_bullet_safety_gym():
    """Importing bullet_safety_gym registers the paper's own tasks with gymnasium; pybullet loads with the first env."""
    try:
        import bullet_safety_gym  # noqa: F401
    except ImportError as error:
        fail(f"{error.name} is missing; install the pinned stack with: pip install --no-deps -r requirements.txt")


def is_bullet_safety_gym_id(env_id):
    """Whether bullet_safety_gym registers the id; its ids have no level digit: SafetyCarCircle-v0 (Safety-Gymnasium's:
    SafetyCarCircle1-v0)."""
    env_id = env_id.split(":")[-1]
    if env_id not in gym.envs.registry:  # only ids that nothing else registers pay for the import
        register_bullet_safety_gym()
    spec = gym.envs.registry.get(env_id)
    return spec is not None and str(spec.entry_point).startswith("bullet_safety_gym")


def check_env_id(env_id):
    if ":" in env_id:
        module = env_id.split(":")[0]
        try:
            __import__(module)
        except ImportError as error:
            fail(f"cannot import module {module!r} of env id {env_id!r}: {error}")
        env_id = env_id.split(":", 1)[1]
    if env_id not in gym.envs.registry and not is_bullet_safety_gym_id(env_id):
        # is_bullet_safety_gym_id has registered the Bullet ids, so they are suggested too.
        close = difflib.get_close_matches(env_id, list(gym.envs.registry), n=3, cutoff=0.6)
        fail(f"unknown env id {env_id!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def validate_args(args):
    if args.num_envs <= 0:
        fail(f"--num-envs must be positive, got {args.num_envs}")
    if args.total_timesteps <= 0:
        fail(f"--total-timesteps must be positive, got {args.total_timesteps}")
    if args.cost_limit < 0:
        fail(f"--cost-limit must be non-negative, got {args.cost_limit}")
    flag = lambda name: "--" + name.replace("_", "-")
    for name in ("batch_size", "buffer_size", "n_step", "update_interval", "updates_per_step", "actor_lr", "critic_lr",
                 "alpha_lr", "initial_alpha", "lagrange_lr", "eval_episodes", "checkpoint_every"):
        if not getattr(args, name) > 0:
            fail(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("learning_starts", "eval_every", "pid_kp", "pid_ki", "pid_kd", "progress_every"):
        if getattr(args, name) < 0:
            fail(f"{flag(name)} must be non-negative, got {getattr(args, name)}")
    for name in ("gamma", "tau"):
        if not 0 < getattr(args, name) <= 1:
            fail(f"{flag(name)} must be in (0, 1], got {getattr(args, name)}")
    if not 0 <= args.pid_cost_smoothing < 1:
        fail(f"--pid-cost-smoothing must be in [0, 1), got {args.pid_cost_smoothing}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive layer widths, got {args.hidden_sizes}")
    for path in (args.resume, args.eval_checkpoint):
        if path is not None and not os.path.isfile(path):
            fail(f"no checkpoint file at {path}")
    check_env_id(args.env_id)


class BulletSafetyGymEnv(gym.Wrapper):
    """A Bullet-Safety-Gym env with gymnasium's seeding and rendering.

    Its reset ignores the seed and draws the start (and in Reach and Push each new goal) from numpy's global generator.
    Here each env draws from its own generator instead, seeded by reset(seed=...) and made the global one while the
    env draws, so a seed repeats an env's episodes even when several envs share a process (SyncVectorEnv). Its render
    takes the mode as an argument rather than from render_mode.
    """

    def __init__(self, env, render_mode=None):
        super().__init__(env)
        env.unwrapped.render_mode = render_mode
        self.random_state = np.random.RandomState()
        self.draws_during_steps = env.unwrapped.task.continue_after_goal_achievement  # a new goal once one is reached

    @contextlib.contextmanager
    def own_global_random_state(self):
        outside = np.random.get_state()
        np.random.set_state(self.random_state.get_state())
        try:
            yield
        finally:
            self.random_state.set_state(np.random.get_state())
            np.random.set_state(outside)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.random_state = np.random.RandomState(seed)
        with self.own_global_random_state():
            return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if not self.draws_during_steps:  # swapping the generator costs about as much as a BallCircle step
            return self.env.step(action)
        with self.own_global_random_state():
            return self.env.step(action)

    def render(self):
        return self.env.unwrapped.render(mode="rgb_array")


def make_env(env_id, seed, render_mode=None):
    is_safety_task = is_safety_gymnasium_id(env_id)
    is_bullet_task = is_bullet_safety_gym_id(env_id)

    def thunk():
        if is_safety_task:
            # A spawned env worker imports the package afresh, so it goes through the workaround too.
            safety_gym = import_safety_gymnasium()
            # Navigation tasks render from the agent's own eyes by default; videos follow it from above instead.
            camera = {"camera_name": "track"} if render_mode and "Velocity" not in env_id else {}
            env = safety_gym.make(env_id, render_mode=render_mode, **camera)
            env = safety_gym.wrappers.SafetyGymnasium2Gymnasium(env)
        elif is_bullet_task:
            register_bullet_safety_gym()  # in a spawned env worker too
            # Building it silences pybullet by redirecting the file descriptors behind sys.stdout and sys.stderr,
            # which must be the process's own streams, not stand-ins such as pytest's.
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                env = gym.make(env_id)
            env = BulletSafetyGymEnv(env, render_mode)
        else:
            env = gym.make(env_id, render_mode=render_mode)
        env.action_space.seed(seed)
        return env

    return thunk


def step_costs(infos, num_envs):
    """Per-env cost of the last step; envs that just reset report it in final_info."""
    costs = np.zeros(num_envs)
    for i in range(num_envs):
        if "final_info" in infos and infos["_final_info"][i]:
            info = infos["final_info"][i]
            if "cost" not in info:
                fail("the env does not report a cost in info['cost']")
            costs[i] = info["cost"]
        elif "cost" in infos and infos["_cost"][i]:
            costs[i] = infos["cost"][i]
        else:
            fail("the env does not report a cost in info['cost']")
    if np.any(costs < 0):  # the cost critics' bootstrap is floored at 0
        fail(f"the env reported a negative cost ({costs.min()}); SAC-Lagrangian needs costs >= 0")
    return costs


class MetricsLogger:
    """Writes every logging point to runs/{run_name}/metrics.jsonl, and to wandb with --track."""

    def __init__(self, run_dir, args, run_name):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if args.track:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if wandb.api.api_key else "offline")
            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                                    name=run_name, id=run_name, resume="allow", mode=mode, dir=run_dir,
                                    tags=[args.env_id, args.exp_name], save_code=True,
                                    settings=wandb.Settings(init_timeout=60))

    def log(self, metrics, step):
        record = {"global_step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(step))

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(global_step, total_timesteps, start_step, start_time, recent):
    sps = (global_step - start_step) / max(time.time() - start_time, 1e-9)
    episodes = (f"return {np.mean(recent['return']):.2f}, cost {np.mean(recent['cost']):.2f} (last "
                f"{len(recent['return'])} episodes)" if recent["return"] else "no episode finished yet")
    return f"global step {global_step:,}/{total_timesteps:,}: {sps:,.0f} steps/s, {episodes}"


def save_checkpoint(path, checkpoint):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as file:
        pickle.dump(checkpoint, file, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".tmp", path)
    return path


def load_checkpoint(path):
    with open(path, "rb") as file:
        return pickle.load(file)


class ReplayBuffer:
    """Time-major ring buffer, one column per env, so n-step returns read along each env's time axis."""

    def __init__(self, capacity, num_envs, obs_dim, action_dim):
        self.rows, self.num_envs = max(capacity // num_envs, 1), num_envs
        self.data = {
            "obs": np.zeros((self.rows, num_envs, obs_dim), np.float32),
            "actions": np.zeros((self.rows, num_envs, action_dim), np.float32),
            "rewards": np.zeros((self.rows, num_envs), np.float32),
            "costs": np.zeros((self.rows, num_envs), np.float32),
            "next_obs": np.zeros((self.rows, num_envs, obs_dim), np.float32),
            "terminated": np.zeros((self.rows, num_envs), bool),
            "episode_ended": np.zeros((self.rows, num_envs), bool),
        }
        self.position, self.full = 0, False

    def add(self, **transition):
        for name, value in transition.items():
            self.data[name][self.position] = value
        self.position = (self.position + 1) % self.rows
        self.full = self.full or self.position == 0

    def size(self):
        return self.rows if self.full else self.position

    def mark_newest_episode_end(self):
        """On resume the envs start new episodes: n-step returns must not run from the old ones into them."""
        if self.size():
            self.data["episode_ended"][(self.position - 1) % self.rows] = True

    def sample_n_step(self, rng, shape, n_step, gamma):
        """n-step returns of reward and cost; a terminal cuts the bootstrap, a truncation keeps it.

        Returns obs, actions, reward_return, cost_return, bootstrap_obs and bootstrap_discount
        (gamma^m, or 0 after a terminal, where m <= n_step is the number of steps summed).
        """
        rows = rng.integers(0, self.size(), shape)
        envs = rng.integers(0, self.num_envs, shape)
        steps_available = (self.position - 1 - rows) % self.rows  # later steps already written
        reward_return, cost_return = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        last_row, included = rows.copy(), np.zeros(shape, np.int32)
        alive = np.ones(shape, bool)
        for i in range(n_step):
            row = (rows + i) % self.rows
            take = alive & (i <= steps_available)
            reward_return += take * gamma**i * self.data["rewards"][row, envs]
            cost_return += take * gamma**i * self.data["costs"][row, envs]
            last_row = np.where(take, row, last_row)
            included += take
            alive = take & ~self.data["episode_ended"][row, envs]
        discount = gamma**included * (1.0 - self.data["terminated"][last_row, envs])
        return {
            "obs": self.data["obs"][rows, envs],
            "actions": self.data["actions"][rows, envs],
            "reward_return": reward_return,
            "cost_return": cost_return,
            "bootstrap_obs": self.data["next_obs"][last_row, envs],
            "bootstrap_discount": discount.astype(np.float32),
        }


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
REWARD_CRITICS, COST_CRITICS = slice(0, 2), slice(2, 4)  # members of the critic ensemble


class Actor(nn.Module):
    """Gaussian over pre-tanh actions with a state-dependent, clipped log standard deviation."""

    action_dim: int
    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs):
        x = obs
        for size in self.hidden_sizes:
            x = nn.relu(nn.Dense(size)(x))
        mean = nn.Dense(self.action_dim)(x)
        log_std = jnp.clip(nn.Dense(self.action_dim)(x), LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std


class QNetwork(nn.Module):
    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        for size in self.hidden_sizes:
            x = nn.relu(nn.Dense(size)(x))
        return nn.Dense(1)(x)[..., 0]


class CriticEnsemble(nn.Module):
    """Twin reward critics and twin cost critics as one vmapped ensemble: output (4, ...)."""

    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs, action):
        ensemble = nn.vmap(QNetwork, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                           out_axes=0, axis_size=4)
        return ensemble(self.hidden_sizes)(obs, action)


@flax.struct.dataclass
class SACLagState:
    actor: TrainState
    critic: TrainState
    target_critic_params: flax.core.FrozenDict
    log_alpha: jax.Array  # log of the entropy temperature
    alpha_opt_state: optax.OptState
    lagrange: jax.Array  # lambda >= 0
    pid_integral: jax.Array  # pid only
    pid_smoothed_cost: jax.Array  # pid only
    lagrange_opt_state: optax.OptState  # gradient only


def squashed_gaussian_sample(mean, log_std, key, action_scale, action_bias):
    """a = bias + scale * tanh(u), u ~ N(mean, std), and log pi(a) with the change of variables."""
    noise = jax.random.normal(key, mean.shape)
    pre_tanh = mean + jnp.exp(log_std) * noise
    gaussian_log_prob = jnp.sum(-0.5 * noise**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
    log_det = jnp.sum(2 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2 * pre_tanh)) + jnp.log(action_scale), axis=-1)
    return action_bias + action_scale * jnp.tanh(pre_tanh), gaussian_log_prob - log_det


def critic_targets(batch, next_q_values, next_log_prob, alpha):
    """TD targets from (4, B) target-critic values and log pi at (bootstrap_obs, a' ~ pi).

    Reward: n-step reward return + discount (min of the twin Q_r - alpha log pi); the entropy bonus belongs to
    the reward only. Cost: n-step cost return + discount max(0, max of the twin Q_c). The discount is gamma^m,
    or 0 after a terminal.

    The actor minimises lambda Q_c, so it seeks the actions whose Q_c is most underestimated, and the bootstrap
    at a' ~ pi carries that error into every target, amplified by 1 / (1 - gamma): a single cost critic drifts
    low, then below zero (TD3's argument for the min of twin reward critics, mirrored). The max of two
    independently trained cost critics is not talked down unless both are; it also prices the actor's actions.
    (cvpo_jax.py --double-critic keeps a target per cost critic instead: CVPO has no actor pushing Q_c down, and
    there the max in the target compounded upwards.) Costs are never negative, so neither is the value bootstrapped from. No
    upper clip: the largest cost per step is not known for an arbitrary env, and an overestimate errs on the safe
    side.
    """
    soft_next_value = next_q_values[REWARD_CRITICS].min(0) - alpha * next_log_prob
    reward_target = batch["reward_return"] + batch["bootstrap_discount"] * soft_next_value
    next_cost_value = jnp.maximum(next_q_values[COST_CRITICS].max(0), 0.0)
    cost_target = batch["cost_return"] + batch["bootstrap_discount"] * next_cost_value
    return reward_target, cost_target


def pid_lagrange(integral, smoothed_cost, episodic_cost, num_episodes, cost_limit, kp, ki, kd, smoothing):
    """PID Lagrangian (Stooke et al. 2020): lambda = [kp (S - d) + ki I + kd [S - S_prev]^+]^+.

    I = [I + J_c - d]^+ integrates J_c, the episodic cost this step is fed (a mean over num_episodes episodes);
    the P and D terms see S, an exponential moving average over episodes started at d, so that the first step
    has no derivative kick and the noise of a few episodes does not flip lambda. smoothing 0 is FSRL's controller
    (whose previous error starts at 0, i.e. S_prev = d).
    """
    weight_kept = smoothing**num_episodes
    new_smoothed_cost = weight_kept * smoothed_cost + (1 - weight_kept) * episodic_cost
    integral = jnp.maximum(0.0, integral + episodic_cost - cost_limit)
    lagrange = jnp.maximum(0.0, kp * (new_smoothed_cost - cost_limit) + ki * integral
                           + kd * jnp.maximum(0.0, new_smoothed_cost - smoothed_cost))
    return lagrange, integral, new_smoothed_cost


def make_train_functions(args, actor, critic, action_scale, action_bias, action_dim):
    """Returns init_state, update_multiplier and train_round, all pure and jitted where it pays."""
    target_entropy = -float(action_dim)
    alpha_optimizer, lagrange_optimizer = optax.adam(args.alpha_lr), optax.adam(args.lagrange_lr)

    def sample_policy(actor_params, obs, key):
        mean, log_std = actor.apply(actor_params, obs)
        return squashed_gaussian_sample(mean, log_std, key, action_scale, action_bias)

    @jax.jit
    def update_multiplier(state, episodic_cost, num_episodes):
        """One step of lambda from the mean cost of the num_episodes episodes finished since the last step."""
        if args.lagrangian_method == "pid":
            lagrange, integral, smoothed_cost = pid_lagrange(
                state.pid_integral, state.pid_smoothed_cost, episodic_cost, num_episodes, args.cost_limit,
                args.pid_kp, args.pid_ki, args.pid_kd, args.pid_cost_smoothing)
            return state.replace(lagrange=lagrange, pid_integral=integral, pid_smoothed_cost=smoothed_cost), {}
        # Gradient descent on -lambda (J_c - d): lambda rises while the cost exceeds the limit.
        lagrange_loss = -state.lagrange * (episodic_cost - args.cost_limit)
        update, opt_state = lagrange_optimizer.update(-(episodic_cost - args.cost_limit), state.lagrange_opt_state)
        lagrange = jnp.maximum(0.0, state.lagrange + update)
        return state.replace(lagrange=lagrange, lagrange_opt_state=opt_state), {"losses/lagrange": lagrange_loss}

    def update_critics(state, batch, key):
        next_actions, next_log_prob = sample_policy(state.actor.params, batch["bootstrap_obs"], key)
        next_q_values = critic.apply(state.target_critic_params, batch["bootstrap_obs"], next_actions)
        reward_target, cost_target = critic_targets(batch, next_q_values, next_log_prob, jnp.exp(state.log_alpha))

        def loss_fn(params):
            q_values = critic.apply(params, batch["obs"], batch["actions"])
            reward_loss = jnp.mean((q_values[REWARD_CRITICS] - reward_target) ** 2)
            cost_loss = jnp.mean((q_values[COST_CRITICS] - cost_target) ** 2)
            return reward_loss + cost_loss, (reward_loss, cost_loss)

        (_, (reward_loss, cost_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic.params)
        critic_state = state.critic.apply_gradients(grads=grads)
        target = optax.incremental_update(critic_state.params, state.target_critic_params, args.tau)
        metrics = {"losses/critic_reward": reward_loss, "losses/critic_cost": cost_loss}
        return state.replace(critic=critic_state, target_critic_params=target), metrics

    def update_actor_and_alpha(state, obs, key):
        alpha, lagrange = jnp.exp(state.log_alpha), state.lagrange

        def actor_loss_fn(params):
            actions, log_prob = sample_policy(params, obs, key)
            q_values = critic.apply(state.critic.params, obs, actions)
            # Dividing by 1 + lambda keeps the gradient scale when lambda grows (Stooke et al., Alg. 1).
            q_cost = q_values[COST_CRITICS].max(0)
            objective = alpha * log_prob - q_values[REWARD_CRITICS].min(0) + lagrange * q_cost
            return jnp.mean(objective) / (1.0 + lagrange), (log_prob, q_cost)

        (actor_loss, (log_prob, q_cost)), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        entropy_gap = jax.lax.stop_gradient(log_prob) + target_entropy
        alpha_loss = -state.log_alpha * jnp.mean(entropy_gap)
        alpha_update, alpha_opt_state = alpha_optimizer.update(-jnp.mean(entropy_gap), state.alpha_opt_state)
        state = state.replace(actor=state.actor.apply_gradients(grads=grads), log_alpha=state.log_alpha + alpha_update,
                              alpha_opt_state=alpha_opt_state)
        metrics = {"losses/actor": actor_loss, "losses/alpha": alpha_loss, "charts/alpha": alpha,
                   "charts/entropy": -jnp.mean(log_prob), "charts/q_cost": jnp.mean(q_cost)}
        return state, metrics

    @jax.jit
    def train_round(state, batches, key):
        """The round's gradient updates (critics, then actor and alpha) scanned over pre-sampled batches."""

        def one_update(state, inputs):
            batch, update_key = inputs
            critic_key, actor_key = jax.random.split(update_key)
            state, critic_metrics = update_critics(state, batch, critic_key)
            state, actor_metrics = update_actor_and_alpha(state, batch["obs"], actor_key)
            return state, {**critic_metrics, **actor_metrics}

        num_updates = batches["obs"].shape[0]
        state, metrics = jax.lax.scan(one_update, state, (batches, jax.random.split(key, num_updates)))
        return state, {**jax.tree.map(jnp.mean, metrics), "charts/lagrange_multiplier": state.lagrange}

    def init_state(key, obs_dim):
        actor_key, critic_key = jax.random.split(key)
        dummy_obs, dummy_action = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        critic_params = critic.init(critic_key, dummy_obs, dummy_action)
        log_alpha, zero = jnp.log(jnp.asarray(args.initial_alpha, jnp.float32)), jnp.zeros(())
        return SACLagState(
            actor=TrainState.create(apply_fn=actor.apply, params=actor.init(actor_key, dummy_obs),
                                    tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            target_critic_params=critic_params,
            log_alpha=log_alpha, alpha_opt_state=alpha_optimizer.init(log_alpha),
            lagrange=zero, pid_integral=zero, pid_smoothed_cost=jnp.asarray(args.cost_limit, jnp.float32),
            lagrange_opt_state=lagrange_optimizer.init(zero))

    return init_state, update_multiplier, train_round


def evaluate(policy, actor_params, env_thunk, episodes, seed):
    """Mean return and cost of the deterministic policy over whole episodes."""
    env = env_thunk()
    returns, costs = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, episode_return, episode_cost = False, 0.0, 0.0
        while not done:
            action = np.asarray(policy(actor_params, obs[None].astype(np.float32)))[0]
            obs, reward, terminated, truncated, info = env.step(action)
            episode_return, episode_cost = episode_return + reward, episode_cost + info["cost"]
            done = terminated or truncated
        returns.append(episode_return)
        costs.append(episode_cost)
    env.close()
    return float(np.mean(returns)), float(np.mean(costs))


def evaluation_metrics(mean_return, mean_cost, cost_limit):
    """The sweeps maximise the penalized return: each unit of cost above the limit costs one unit of return."""
    return {"eval/episodic_return": mean_return, "eval/episodic_cost": mean_cost,
            "eval/penalized_return": mean_return - max(0.0, mean_cost - cost_limit)}


def main(args):
    validate_args(args)
    checkpoint = None
    if args.resume or args.eval_checkpoint:
        checkpoint = load_checkpoint(args.resume or args.eval_checkpoint)
        cli, defaults = vars(args), vars(Args())
        args = Args(**{**checkpoint["args"], "resume": args.resume, "eval_checkpoint": args.eval_checkpoint,
                       **{k: cli[k] for k in SESSION_FLAGS if cli[k] != defaults[k]}})
        run_name = checkpoint["run_name"]
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume or args.eval_checkpoint)))
    else:
        run_name = f"{args.env_id.split(':')[-1]}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)

    probe_env = make_env(args.env_id, args.seed)()
    if not isinstance(probe_env.action_space, gym.spaces.Box) or len(probe_env.observation_space.shape) != 1:
        fail("SAC-Lagrangian needs a flat Box observation space and a Box action space")
    obs_dim, action_dim = probe_env.observation_space.shape[0], probe_env.action_space.shape[0]
    action_low, action_high = probe_env.action_space.low, probe_env.action_space.high
    if not (np.all(np.isfinite(action_low)) and np.all(np.isfinite(action_high))):
        fail("SAC-Lagrangian squashes actions into the action bounds, which must be finite")
    probe_env.close()
    if not args.eval_checkpoint:  # forked env workers must start before JAX starts its threads
        envs_class = gym.vector.AsyncVectorEnv if args.async_envs and args.num_envs > 1 else gym.vector.SyncVectorEnv
        envs = envs_class([make_env(args.env_id, args.seed + i) for i in range(args.num_envs)])
    action_scale = jnp.asarray((action_high - action_low) / 2, jnp.float32)
    action_bias = jnp.asarray((action_high + action_low) / 2, jnp.float32)
    eval_render_mode = "rgb_array" if args.capture_video else None

    def eval_env_thunk(name):
        thunk = make_env(args.env_id, args.seed + 10_000, eval_render_mode)
        if not args.capture_video:
            return thunk
        return lambda: gym.wrappers.RecordVideo(thunk(), os.path.join(run_dir, "videos"), name_prefix=name,
                                                episode_trigger=lambda _: True, disable_logger=True)

    actor = Actor(action_dim, tuple(args.hidden_sizes))
    critic = CriticEnsemble(tuple(args.hidden_sizes))
    init_state, update_multiplier, train_round = make_train_functions(args, actor, critic, action_scale,
                                                                      action_bias, action_dim)
    key = jax.random.PRNGKey(args.seed)
    key, init_key = jax.random.split(key)
    state = init_state(init_key, obs_dim)
    deterministic_policy = jax.jit(lambda params, obs: action_bias + action_scale * jnp.tanh(
        actor.apply(params, obs)[0]))

    if args.eval_checkpoint:
        actor_params = flax.serialization.from_state_dict(state, checkpoint["state"]).actor.params
        mean_return, mean_cost = evaluate(deterministic_policy, actor_params, eval_env_thunk("checkpoint"),
                                          args.eval_episodes, args.seed + 10_000)
        result = {"checkpoint": args.eval_checkpoint, "global_step": checkpoint["global_step"],
                  "episodes": args.eval_episodes, **evaluation_metrics(mean_return, mean_cost, args.cost_limit)}
        print(json.dumps(result))
        return result

    buffer = ReplayBuffer(args.buffer_size, args.num_envs, obs_dim, action_dim)
    rng = np.random.default_rng(args.seed)
    global_step, costs_since_multiplier_step = 0, []  # episodic costs that the next multiplier step averages
    if checkpoint is not None:
        state = flax.serialization.from_state_dict(state, checkpoint["state"])
        key, global_step = jnp.asarray(checkpoint["key"]), checkpoint["global_step"]
        buffer.data, buffer.position, buffer.full = checkpoint["buffer"], checkpoint["buffer_position"], checkpoint["buffer_full"]
        rng.bit_generator.state = checkpoint["rng_state"]
        costs_since_multiplier_step = checkpoint["costs_since_multiplier_step"]
        buffer.mark_newest_episode_end()  # the envs restart their episodes now
    acting_params = state.actor.params  # the actor that collects: the last finished round's
    if checkpoint is not None and "acting_actor_params" in checkpoint:
        acting_params = flax.serialization.from_state_dict(acting_params, checkpoint["acting_actor_params"])
    logger = MetricsLogger(run_dir, args, run_name)
    checkpoint_path = os.path.join(run_dir, "checkpoints", "checkpoint.pkl")

    def write_checkpoint(agent_state, step):
        return save_checkpoint(checkpoint_path, {
            "args": vars(args), "run_name": run_name, "global_step": step, "key": np.asarray(key),
            "state": flax.serialization.to_state_dict(jax.device_get(agent_state)),
            "acting_actor_params": flax.serialization.to_state_dict(jax.device_get(acting_params)),
            "buffer": buffer.data, "buffer_position": buffer.position, "buffer_full": buffer.full,
            "rng_state": rng.bit_generator.state, "costs_since_multiplier_step": costs_since_multiplier_step})

    sample_actions = jax.jit(lambda params, obs, key: squashed_gaussian_sample(
        *actor.apply(params, obs), key, action_scale, action_bias)[0])
    updates_per_round = max(1, round(args.update_interval * args.updates_per_step))

    def finish_round(round_in_flight):
        """Wait for a dispatched round, check and log its metrics, and return the state it produced."""
        state_before, state_after, metrics = round_in_flight
        metrics = jax.device_get(metrics)
        for name, value in metrics.items():
            if not np.isfinite(value):
                path = write_checkpoint(state_before, global_step)
                fail(f"{name} became {value} at global step {global_step}; last finite state saved to {path}")
        sps = (global_step - start_step) / (time.time() - start_time)
        logger.log({**metrics, "charts/SPS": sps}, global_step)
        progress.set_postfix(ret=f"{np.mean(recent['return'] or [0]):.1f}",
                             cost=f"{np.mean(recent['cost'] or [0]):.1f}", sps=f"{sps:.0f}",
                             lag=f"{metrics['charts/lagrange_multiplier']:.2f}")
        return state_after

    # Ctrl-C and SIGTERM are acted on between loop iterations, where the state, the buffer and the step agree.
    stop_signals = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stop_signals.append(signum))
    obs, _ = envs.reset(seed=args.seed + global_step)
    episode_returns, episode_costs = np.zeros(args.num_envs), np.zeros(args.num_envs)
    episode_lengths = np.zeros(args.num_envs, np.int64)
    recent = {"return": [], "cost": []}
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=args.total_timesteps, initial=global_step, unit="step", disable=None)
    next_report = time.time() + args.progress_every  # without a terminal, a progress line every so often
    round_in_flight = None  # (state before, state after, metrics) of the round dispatched at the last boundary
    try:
        while global_step < args.total_timesteps:
            if stop_signals:
                raise KeyboardInterrupt
            key, action_key = jax.random.split(key)
            actions = np.asarray(sample_actions(acting_params, obs.astype(np.float32), action_key))
            next_obs, rewards, terminations, truncations, infos = envs.step(actions)
            costs = step_costs(infos, args.num_envs)
            ended = terminations | truncations
            real_next_obs = next_obs.copy()
            for i in np.flatnonzero(ended):
                real_next_obs[i] = infos["final_observation"][i]
            buffer.add(obs=obs, actions=actions, rewards=rewards, costs=costs, next_obs=real_next_obs,
                       terminated=terminations, episode_ended=ended)
            obs = next_obs
            previous_step, global_step = global_step, global_step + args.num_envs
            progress.update(args.num_envs)

            episode_returns += rewards
            episode_costs += costs
            episode_lengths += 1
            if ended.any():
                logger.log({"charts/episodic_return": episode_returns[ended].mean(),
                            "charts/episodic_cost": episode_costs[ended].mean(),
                            "charts/episodic_length": episode_lengths[ended].mean(),
                            "charts/episodes_ended": ended.sum(),
                            "charts/cost_violation": np.maximum(episode_costs[ended] - args.cost_limit, 0.0).mean(),
                            "charts/cost_limit": args.cost_limit}, global_step)
                costs_since_multiplier_step += list(episode_costs[ended])
                recent["return"] = (recent["return"] + list(episode_returns[ended]))[-20:]
                recent["cost"] = (recent["cost"] + list(episode_costs[ended]))[-20:]
                progress.set_postfix(ret=f"{np.mean(recent['return']):.1f}", cost=f"{np.mean(recent['cost']):.1f}")
                episode_returns[ended], episode_costs[ended], episode_lengths[ended] = 0.0, 0.0, 0

            if global_step >= args.learning_starts and global_step // args.update_interval > previous_step // args.update_interval:
                if round_in_flight is not None:
                    state, round_in_flight = finish_round(round_in_flight), None
                state_before, multiplier_metrics = state, {}
                if costs_since_multiplier_step:
                    state, multiplier_metrics = update_multiplier(state, np.mean(costs_since_multiplier_step),
                                                                  len(costs_since_multiplier_step))
                    costs_since_multiplier_step = []
                batches = buffer.sample_n_step(rng, (updates_per_round, args.batch_size), args.n_step, args.gamma)
                key, round_key = jax.random.split(key)
                # JAX dispatches the round and returns at once: with overlap it runs while the envs step
                state_after, round_metrics = train_round(state, batches, round_key)
                round_in_flight = (state_before, state_after, {**round_metrics, **multiplier_metrics})
                if not args.overlap_learning:
                    state, round_in_flight = finish_round(round_in_flight), None
                acting_params = state.actor.params

            if args.eval_every and global_step // args.eval_every > previous_step // args.eval_every:
                mean_return, mean_cost = evaluate(deterministic_policy, acting_params,
                                                  eval_env_thunk(f"step{global_step}"), args.eval_episodes,
                                                  args.seed + 10_000)
                logger.log(evaluation_metrics(mean_return, mean_cost, args.cost_limit), global_step)
            if args.save_model and global_step // args.checkpoint_every > previous_step // args.checkpoint_every:
                if round_in_flight is not None:  # the round's result is saved; acting still lags as it would
                    state, round_in_flight = finish_round(round_in_flight), None
                write_checkpoint(state, global_step)
            if progress.disable and time.time() >= next_report:
                next_report = time.time() + args.progress_every
                print(progress_line(global_step, args.total_timesteps, start_step, start_time, recent), flush=True)
    except KeyboardInterrupt:
        if round_in_flight is not None:
            state = finish_round(round_in_flight)
        path = write_checkpoint(state, global_step)
        progress.close()
        with contextlib.suppress(Exception):  # on Ctrl-C the env workers were interrupted too
            envs.close(terminate=True)
        logger.close()
        sys.exit(f"interrupted at global step {global_step}; resume with --resume {path}")
    if round_in_flight is not None:
        state = finish_round(round_in_flight)
    progress.close()
    envs.close()
    mean_return, mean_cost = evaluate(deterministic_policy, state.actor.params, eval_env_thunk("final"),
                                      args.eval_episodes, args.seed + 10_000)
    logger.log(evaluation_metrics(mean_return, mean_cost, args.cost_limit), global_step)
    if args.save_model:
        print(f"checkpoint written to {write_checkpoint(state, global_step)}")
    logger.close()
    print(f"{run_name}: eval return {mean_return:.2f}, eval cost {mean_cost:.2f} over {args.eval_episodes} episodes")
    return state


if __name__ == "__main__":
    main(tyro.cli(Args))
