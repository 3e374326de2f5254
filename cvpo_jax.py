# CVPO: Constrained Variational Policy Optimization (Liu et al., ICML 2022, arXiv:2201.11927).
# Docs: README.md, section "cvpo_jax.py". One file, jitted end to end: critics, E-step, M-step.
import contextlib
import dataclasses
import difflib
import io
import json
import math
import os
import pickle
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

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
    gamma: float = 0.995
    """discount factor"""
    n_step: int = 3
    """steps in the TD targets of both critics"""
    tau: float = 0.05
    """Polyak rate of the target critics"""
    buffer_size: int = 200_000
    """replay buffer capacity in transitions"""
    batch_size: int = 256
    """states per gradient update"""
    learning_starts: Optional[int] = None
    """env steps collected before the first update (computed at run time: one round, as FSRL's first collect)"""
    updates_per_step: float = 0.2
    """gradient updates per env step"""
    update_interval: Optional[int] = None
    """env steps per round of updates, after which pi_old is refreshed (computed at run time: 10 episodes, as FSRL)"""
    policy_state_window: Optional[int] = None
    """the E-step and M-step take their states from this many newest env steps (computed at run time: one round)"""
    overlap_learning: bool = False
    """learn each round while the envs collect the next with the last finished actor (acting lags one round)"""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """hidden layers of the actor and of each critic"""
    mean_bound: float = 1.5
    """the actor's mean stays inside the action box widened this many times about its centre (0: unbounded)"""
    double_critic: bool = True
    """two critics per signal, the E-step taking the reward pair's min and the cost pair's max (else one each, as FSRL)"""
    critic_lr: float = 1e-3
    """learning rate of the critics"""
    actor_lr: float = 5e-4
    """learning rate of the actor (M-step)"""
    num_sampled_actions: int = 16
    """K: actions sampled from pi_old per state in the E-step"""
    estep_kl: float = 0.02
    """eps_kl: bound on KL(q || pi_old) in the E-step"""
    estep_solver: Literal["newton", "fsrl"] = "newton"
    """newton: solve the E-step dual to its KKT tolerance each update; fsrl: one Adam step per update (FSRL)"""
    estep_dual_lr: float = 0.02
    """Adam rate on (eta, lambda) of the fsrl solver"""
    estep_max_iterations: int = 50
    """Newton iteration cap of the newton solver"""
    estep_tolerance: float = 1e-3
    """the newton solver stops when KL(q || pi_old) and E_q[Q_c] meet their bounds to this relative tolerance"""
    estep_dual_min: float = 1e-6
    """lower bound of eta (and of lambda with the fsrl solver)"""
    estep_dual_max: Optional[float] = None
    """upper bound of lambda (and of eta with fsrl) (computed at run time: 1e5 for newton, 20 for fsrl, as FSRL)"""
    mstep_kl_mu: float = 0.005
    """eps_mu: bound on the KL of the mean in the M-step"""
    mstep_kl_sigma: float = 0.0005
    """eps_sigma: bound on the KL of the standard deviation in the M-step"""
    mstep_kl_std_floor: float = 0.1
    """the KL of the mean measures its move against max(sigma_old, this floor) (in action units)"""
    mstep_dual_lr: float = 0.1
    """rate of the M-step multipliers alpha_mu, alpha_sigma in log space (kept across rounds)"""
    mstep_dual_min: float = 1e-3
    """lower bound of the M-step multipliers"""
    mstep_dual_max: float = 1e4
    """upper bound of the M-step multipliers"""
    episode_length: Optional[int] = None
    """episode length T for the cost threshold (computed at run time from the env spec when unset)"""


# Flags that may differ between a run and its resumption; every other flag comes from the checkpoint.
SESSION_FLAGS = ("total_timesteps", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model",
                 "checkpoint_every", "eval_every", "eval_episodes", "async_envs", "progress_every")


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
    for name in ("batch_size", "buffer_size", "n_step", "update_interval", "policy_state_window", "updates_per_step",
                 "num_sampled_actions", "critic_lr", "actor_lr", "estep_kl", "estep_dual_lr", "estep_max_iterations",
                 "estep_dual_min", "estep_dual_max", "mstep_kl_mu", "mstep_kl_sigma", "mstep_dual_lr", "mstep_dual_min",
                 "eval_episodes", "checkpoint_every"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            fail(f"{flag(name)} must be positive, got {getattr(args, name)}")
    if args.mean_bound != 0 and not 1 <= args.mean_bound < math.inf:
        fail(f"--mean-bound must be 0 (unbounded) or a finite number of at least 1 (the box itself), got {args.mean_bound}")
    for name in ("learning_starts", "eval_every", "estep_tolerance", "progress_every", "mstep_kl_std_floor"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"{flag(name)} must be non-negative, got {getattr(args, name)}")
    if not 0 < args.gamma < 1:
        fail(f"--gamma must be in (0, 1) (the cost threshold divides by 1 - gamma), got {args.gamma}")
    if not 0 < args.tau <= 1:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    if args.estep_dual_max is not None and not 0 < args.estep_dual_min < args.estep_dual_max:
        fail(f"need 0 < --estep-dual-min < --estep-dual-max, got {args.estep_dual_min}, {args.estep_dual_max}")
    if not 0 < args.mstep_dual_min < args.mstep_dual_max:
        fail(f"need 0 < --mstep-dual-min < --mstep-dual-max, got {args.mstep_dual_min}, {args.mstep_dual_max}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive layer widths, got {args.hidden_sizes}")
    if args.policy_state_window is not None and args.policy_state_window > args.buffer_size:
        fail(f"--policy-state-window must be at most --buffer-size ({args.buffer_size}), got {args.policy_state_window}")
    if args.episode_length is not None and args.episode_length <= 0:
        fail(f"--episode-length must be positive, got {args.episode_length}")
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


def args_from_checkpoint(checkpoint, cli_args):
    """The run's flags from its checkpoint, but for the session flags given on this command line."""
    # checkpoints from before --mean-bound had an unbounded mean, and from before --double-critic one critic per signal
    stored = {"mean_bound": 0.0, "double_critic": False, **checkpoint["args"]}
    cli, defaults = vars(cli_args), vars(Args())
    return Args(**{**stored, "resume": cli_args.resume, "eval_checkpoint": cli_args.eval_checkpoint,
                   **{k: cli[k] for k in SESSION_FLAGS if cli[k] != defaults[k]}})


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

    def latest(self, rows):
        """The newest rows (at most `rows`), oldest first."""
        order = (self.position - np.arange(min(rows, self.size()), 0, -1)) % self.rows
        return {name: values[order] for name, values in self.data.items()}

    def mark_newest_episode_end(self):
        """On resume the envs start new episodes: n-step returns must not run from the old ones into them."""
        if self.size():
            self.data["episode_ended"][(self.position - 1) % self.rows] = True

    def sample_recent_obs(self, rng, shape, rows):
        """Observations drawn uniformly from the newest `rows` rows (at most the whole buffer), all envs."""
        age = rng.integers(1, min(rows, self.size()) + 1, shape)
        return self.data["obs"][(self.position - age) % self.rows, rng.integers(0, self.num_envs, shape)]

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


def discounted_cost_to_go(costs, episode_ended, terminated, gamma):
    """Monte Carlo discounted cost-to-go of each step of time-major (T, N) data, within its episode.

    Steps whose episode does not end inside the data get NaN. After a time-limit truncation the critics keep
    bootstrapping, so the episode's mean cost per step is continued forever there: the value that a critic of the
    infinite-horizon discounted cost estimates for a stationary cost.
    """
    values = np.full(costs.shape, np.nan)
    for env in range(costs.shape[1]):
        start = 0
        for end in np.flatnonzero(episode_ended[:, env]):
            future = 0.0 if terminated[end, env] else costs[start:end + 1, env].mean() / (1 - gamma)
            for t in range(end, start - 1, -1):
                future = costs[t, env] + gamma * future
                values[t, env] = future
            start = end + 1
    return values


def cost_critic_bias(buffer, rows, gamma, cost_q):
    """The cost critic at the states and actions of the newest `rows` buffer rows against their Monte Carlo
    cost-to-go, and at as many rows spread evenly over the whole buffer (the states that old data covers)."""
    recent = buffer.latest(rows)
    cost_to_go = discounted_cost_to_go(recent["costs"], recent["episode_ended"], recent["terminated"], gamma)
    known = np.isfinite(cost_to_go)
    if not known.any():
        return {}
    spread = np.linspace(0, buffer.size() - 1, len(recent["obs"])).astype(int)
    q_cost = np.asarray(cost_q(recent["obs"], recent["actions"]))
    return {"bias/q_cost_recent": float(q_cost[known].mean()), "bias/mc_cost_recent": float(cost_to_go[known].mean()),
            "bias/q_cost_replay": float(np.mean(cost_q(buffer.data["obs"][spread], buffer.data["actions"][spread])))}


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Actor(nn.Module):
    """Diagonal Gaussian with a state-dependent standard deviation. Its mean is unbounded, except on the dimensions
    where mean_half_range is positive: there a tanh of slope 1 at mean_centre keeps it within mean_half_range of it."""

    action_dim: int
    hidden_sizes: tuple
    mean_centre: Optional[tuple] = None
    mean_half_range: Optional[tuple] = None

    @nn.compact
    def __call__(self, obs):
        x = obs
        for size in self.hidden_sizes:
            x = nn.relu(nn.Dense(size)(x))
        mean = nn.Dense(self.action_dim)(x)
        if self.mean_half_range is not None:
            centre, half_range = jnp.asarray(self.mean_centre), jnp.asarray(self.mean_half_range)
            bounded = centre + half_range * jnp.tanh(mean / jnp.where(half_range > 0, half_range, 1.0))
            mean = jnp.where(half_range > 0, bounded, mean)
        log_std = jnp.clip(nn.Dense(self.action_dim)(x), LOG_STD_MIN, LOG_STD_MAX)
        return mean, jnp.exp(log_std)


def mean_bounds(action_low, action_high, mean_bound):
    """The Actor's mean_centre and mean_half_range: the action box widened mean_bound times about its centre; a zero
    half-range (an unbounded mean) where mean_bound is 0 or the box is infinite."""
    finite = np.isfinite(action_low) & np.isfinite(action_high) & (mean_bound > 0)
    low, high = np.where(finite, action_low, 0.0), np.where(finite, action_high, 0.0)
    centre, half_range = (low + high) / 2, mean_bound * (high - low) / 2
    return tuple(float(c) for c in centre), tuple(float(h) for h in half_range)


class QNetwork(nn.Module):
    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs, action):
        # The first layer on (obs, action) as a state part plus an action part, initialised as one layer on their
        # concatenation: obs of shape (B, 1, obs_dim) against actions (B, K, action_dim) computes each state's part
        # once for its K sampled actions.
        fan_in = obs.shape[-1] + action.shape[-1]
        part_init = lambda dim: nn.initializers.variance_scaling(dim / fan_in, "fan_in", "truncated_normal")
        x = nn.relu(nn.Dense(self.hidden_sizes[0], kernel_init=part_init(obs.shape[-1]))(obs)
                    + nn.Dense(self.hidden_sizes[0], use_bias=False, kernel_init=part_init(action.shape[-1]))(action))
        for size in self.hidden_sizes[1:]:
            x = nn.relu(nn.Dense(size)(x))
        return nn.Dense(1)(x)[..., 0]


class CriticEnsemble(nn.Module):
    """Reward critics then cost critics, one vmapped ensemble: output (2 * critics_per_signal, ...)."""

    hidden_sizes: tuple
    critics_per_signal: int

    @nn.compact
    def __call__(self, obs, action):
        ensemble = nn.vmap(QNetwork, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                           out_axes=0, axis_size=2 * self.critics_per_signal)
        return ensemble(self.hidden_sizes)(obs, action)


@flax.struct.dataclass
class CVPOState:
    actor: TrainState
    critic: TrainState
    target_critic_params: flax.core.FrozenDict
    old_actor_params: flax.core.FrozenDict  # pi_old: the actor that collected the current round
    duals: jax.Array  # eta, lambda: the E-step duals of the last feasible update, warm-starting the next
    cost_temperature: jax.Array  # the temperature of the least-cost q inside the KL ball, warm-started too
    dual_opt_state: optax.OptState  # used by the fsrl solver only
    mstep_log_alphas: jax.Array  # log alpha_mu, log alpha_sigma: the M-step multipliers, kept across rounds


def gaussian_log_prob(x, mean, std):
    return jnp.sum(-0.5 * ((x - mean) / std) ** 2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def decoupled_gaussian_kl(mean_old, std_old, mean, std, std_floor=0.0):
    """MPO's decoupled KL(pi_old || pi): the mean part (std fixed to std_old) and the std part (mean fixed).

    The mean part measures the move against max(std_old, std_floor): where pi_old is nearly deterministic, a small
    absolute move of the mean would otherwise count as a huge KL, and a few such states dominate a batch's mean.
    """
    kl_mean = jnp.mean(jnp.sum((mean_old - mean) ** 2 / (2 * jnp.maximum(std_old, std_floor) ** 2), axis=-1))
    kl_std = jnp.mean(jnp.sum(0.5 * (2 * jnp.log(std / std_old) + std_old**2 / std**2 - 1), axis=-1))
    return kl_mean, kl_std


def estep_dual(duals, q_reward, q_cost, eps_kl, eps_cost):
    """g(eta, lambda) on (B, K) Q values; its minimiser gives q(a_k|s) = softmax_k((Q_r - lambda Q_c) / eta)."""
    eta, lagrange = duals[0], duals[1]
    # lambda eps_cost is taken inside the log-sum-exp as lambda (Q_c - eps_cost): the same g, without the
    # cancellation of two large terms when lambda is large.
    scaled = (q_reward - lagrange * (q_cost - eps_cost)) / eta
    log_mean_exp = jax.nn.logsumexp(scaled, axis=1) - jnp.log(q_reward.shape[1])
    return eta * eps_kl + eta * jnp.mean(log_mean_exp)


def estep_dual_derivatives(duals, q_reward, q_cost, eps_kl, eps_cost):
    """Value, gradient and Hessian of g in closed form, from the moments of Q_r - lambda Q_c and Q_c under q.

    The gradient is the slack of the two constraints: (eps_kl - KL(q || pi_old), eps_cost - E_q[Q_c]).
    """
    eta, lagrange = duals[0], duals[1]
    advantage = q_reward - lagrange * (q_cost - eps_cost)
    log_weights = jax.nn.log_softmax(advantage / eta, axis=1)
    weights = jnp.exp(log_weights)
    kl = jnp.mean(jnp.sum(weights * (log_weights + jnp.log(q_reward.shape[1])), axis=1))
    advantage_dev = advantage - jnp.sum(weights * advantage, axis=1, keepdims=True)
    cost_dev = q_cost - jnp.sum(weights * q_cost, axis=1, keepdims=True)
    var_advantage, var_cost, covariance = (jnp.mean(jnp.sum(weights * x * y, axis=1)) for x, y in (
        (advantage_dev, advantage_dev), (cost_dev, cost_dev), (advantage_dev, cost_dev)))
    gradient = jnp.stack([eps_kl - kl, eps_cost - jnp.mean(jnp.sum(weights * q_cost, axis=1))])
    hessian = jnp.array([[var_advantage / eta**3, covariance / eta**2], [covariance / eta**2, var_cost / eta]])
    return estep_dual(duals, q_reward, q_cost, eps_kl, eps_cost), gradient, hessian


def estep_cost_unit(eps_cost, q_cost):
    """The scale on which the cost bound is met: eps_cost, or the spread of Q_c over the samples when larger."""
    return jnp.maximum(eps_cost, jnp.mean(jnp.std(q_cost, axis=1))) + 1e-8


def estep_kkt_residual(slack, at_lower, at_upper, eps_kl, eps_cost, q_cost):
    """Largest violation of the E-step's KKT conditions: a dual inside its bounds needs a zero slack, one on its
    lower (upper) bound a non-negative (non-positive) one. The KL is measured in units of eps_kl, the cost in units
    of estep_cost_unit."""
    units = jnp.stack([eps_kl, estep_cost_unit(eps_cost, q_cost)])
    residual = jnp.where(at_lower, jnp.minimum(slack, 0.0), jnp.where(at_upper, jnp.maximum(slack, 0.0), slack))
    residual = jnp.where(at_lower & at_upper, 0.0, residual)  # a dual fixed by its bounds
    return jnp.max(jnp.abs(residual) / units)


def minimise_dual(duals, q_reward, q_cost, eps_kl, eps_cost, lambda_bounds, max_iterations, tolerance, eta_min):
    """Minimise g over eta >= eta_min and lambda in lambda_bounds by projected Newton steps from `duals`.

    The steps are taken in (log eta, lambda), at most a factor e^2 in eta at a time, since g is nearly linear in
    eta far from its minimum. Stops once the KKT residual (estep_kkt_residual) is within tolerance. Returns the
    duals, the Newton iterations taken and the KKT residual.
    """
    lower, upper = jnp.array([jnp.log(eta_min), lambda_bounds[0]]), jnp.array([jnp.inf, lambda_bounds[1]])

    q_reward = q_reward - jnp.mean(q_reward, axis=1, keepdims=True)  # shifts g by a constant, for float32

    def derivatives(y):  # of g in y = (log eta, lambda); the Hessian keeps only its positive curvature
        eta = jnp.exp(y[0])
        value, slack, hessian = estep_dual_derivatives(jnp.stack([eta, y[1]]), q_reward, q_cost, eps_kl, eps_cost)
        gradient = slack * jnp.stack([eta, 1.0])
        hessian = hessian * jnp.outer(jnp.stack([eta, 1.0]), jnp.stack([eta, 1.0]))
        hessian = hessian.at[0, 0].add(jnp.maximum(gradient[0], 0.0))
        return value, slack, gradient, hessian

    kkt_residual = lambda y, slack: estep_kkt_residual(slack, y <= lower, y >= upper, eps_kl, eps_cost, q_cost)

    def not_converged(carry):
        y, value, slack, gradient, hessian, iteration, stalled = carry
        return (iteration < max_iterations) & ~stalled & (kkt_residual(y, slack) > tolerance)

    def newton_step(carry):
        y, value, slack, gradient, hessian, iteration, _ = carry
        # A dual held on a bound by its gradient stays there; the Newton step moves the others.
        free = ~(((y <= lower) & (gradient > 0)) | ((y >= upper) & (gradient < 0)))
        reduced = jnp.where(free[:, None] & free[None, :], hessian, jnp.eye(2))
        # g is nearly linear along some directions (a constant Q, or the ray eta / lambda = const when lambda is
        # large), so the Hessian can be singular: solve it scaled to a unit diagonal and slightly damped.
        scale = 1.0 / jnp.sqrt(jnp.diag(reduced) + 1e-30)
        normalized = reduced * jnp.outer(scale, scale) + 1e-4 * jnp.eye(2)
        direction = -scale * jnp.linalg.solve(normalized, scale * jnp.where(free, gradient, 0.0))
        direction = jnp.clip(jnp.nan_to_num(direction), -1e12, 1e12)
        # Move eta by at most a factor e^2: clip that coordinate alone while the step still descends, else
        # shorten the whole step.
        clipped = direction.at[0].set(jnp.clip(direction[0], -2.0, 2.0))
        shortened = direction * jnp.minimum(1.0, 2.0 / (jnp.abs(direction[0]) + 1e-30))
        direction = jnp.where(jnp.dot(gradient, clipped) < 0, clipped, shortened)

        # Backtrack until g decreases enough. Where float32 cannot resolve the change of g (near the optimum, or
        # where g is nearly linear), a step after which g still descends along the step is taken too.
        def evaluate(step):
            candidate = jnp.clip(y + step * direction, lower, upper)
            return (step, candidate, *derivatives(candidate))

        def acceptable(search):
            step, candidate, candidate_value, _, candidate_gradient, _ = search
            decrease = candidate_value - value
            sufficient = decrease <= 1e-4 * jnp.dot(gradient, candidate - y)
            descending = (jnp.dot(candidate_gradient, candidate - y) <= 0) & (decrease <= 1e-5 * jnp.abs(value))
            return sufficient | descending

        search = jax.lax.while_loop(lambda search: ~acceptable(search) & (search[0] > 2.0**-20),
                                    lambda search: evaluate(search[0] / 2), evaluate(1.0))
        stalled = ~acceptable(search)
        accepted = jax.tree.map(lambda new, old: jnp.where(stalled, old, new), search[1:],
                                (y, value, slack, gradient, hessian))
        return (*accepted, iteration + 1, stalled)

    y = jnp.clip(jnp.stack([jnp.log(duals[0]), duals[1]]), lower, upper)
    y, _, slack, _, _, iterations, _ = jax.lax.while_loop(not_converged, newton_step,
                                                          (y, *derivatives(y), 0, False))
    return jnp.stack([jnp.exp(y[0]), y[1]]), iterations, kkt_residual(y, slack)


def solve_estep(duals, cost_temperature, q_reward, q_cost, eps_kl, eps_cost, max_iterations, tolerance, dual_min,
                dual_max):
    """The E-step, feasible or not: the logits of q(a_k|s) over the K samples, and how they were found.

    First the least expected cost inside the KL ball: g with Q_r = 0 and lambda = 1 is the dual of that problem,
    minimised over its temperature alone. If it does not undercut eps_cost by more than the tolerance, no q inside
    the ball meets the cost bound (lambda is unbounded), and q is that cost minimiser. Otherwise g is minimised over
    (eta, lambda), warm-started from the last feasible update. Returns the new duals (eta, lambda: kept from the last
    feasible update when infeasible), the cost temperature, the logits, the infeasibility flag, the Newton iterations
    of both solves and the KKT residual of the solution.
    """
    no_reward = jnp.zeros_like(q_cost)
    (cost_temperature, _), cost_iterations, cost_residual = minimise_dual(
        jnp.stack([cost_temperature, 1.0]), no_reward, q_cost, eps_kl, eps_cost, (1.0, 1.0), max_iterations, tolerance,
        dual_min)
    _, least_cost_slack, _ = estep_dual_derivatives(jnp.stack([cost_temperature, 1.0]), no_reward, q_cost, eps_kl,
                                                    eps_cost)
    infeasible = least_cost_slack[1] < tolerance * estep_cost_unit(eps_cost, q_cost)

    def feasible_solve(duals):
        return minimise_dual(duals, q_reward, q_cost, eps_kl, eps_cost, (0.0, dual_max), max_iterations, tolerance,
                             dual_min)

    duals, iterations, residual = jax.lax.cond(infeasible, lambda duals: (duals, 0, cost_residual), feasible_solve,
                                               duals)
    logits = jnp.where(infeasible, -q_cost / cost_temperature, (q_reward - duals[1] * q_cost) / duals[0])
    return duals, cost_temperature, logits, infeasible, cost_iterations + iterations, residual


def cost_threshold(cost_limit, gamma, episode_length):
    """The episodic budget d as a bound on Q_c: d / ((1 - gamma) T), the discounted cost-to-go of a cost of d / T
    per step. The critics bootstrap through time-limit truncations, so they estimate this infinite-horizon value."""
    return cost_limit / ((1 - gamma) * episode_length)


class CVPOUpdates(NamedTuple):
    update_critics: Callable  # (state, batch, key) -> state, metrics
    estep: Callable  # (state, obs, key) -> state, sampled actions, weights q(a_k|s), metrics
    mstep: Callable  # (state, obs, sampled, weights) -> state, metrics
    train_round: Callable  # jitted: (state, batches, key) -> state, per-round metrics
    init_state: Callable  # (key, obs_dim, action_dim) -> state


# Bounded quantities whose largest value within a round is logged beside the round mean.
ROUND_MAXIMA = ("estep/kl_q_pi_old", "estep/q_cost", "estep/kkt_residual", "mstep/kl_mu", "mstep/kl_sigma")


def make_train_round(args, actor, critic, action_low, action_high, eps_cost):
    critics = 2 if args.double_critic else 1
    dual_optimizer = optax.adam(args.estep_dual_lr)
    mstep_bounds = jnp.array([args.mstep_kl_mu, args.mstep_kl_sigma])
    log_alpha_bounds = jnp.log(args.mstep_dual_min), jnp.log(args.mstep_dual_max)

    def reward_and_cost(q_values):
        return q_values[:critics].min(0), q_values[critics:].max(0)

    def update_critics(state, batch, key):
        mean, std = actor.apply(state.actor.params, batch["bootstrap_obs"])
        next_actions = jnp.clip(mean + std * jax.random.normal(key, mean.shape), action_low, action_high)
        next_q = critic.apply(state.target_critic_params, batch["bootstrap_obs"], next_actions)
        # The reward critics share the min of their targets (TD3). Each cost critic bootstraps on its own target:
        # a max in the target would compound through every bootstrap, and on a sparse cost it priced states at
        # several times their Monte Carlo cost-to-go; the E-step takes the max of the cost critics instead.
        reward_target = batch["reward_return"] + batch["bootstrap_discount"] * next_q[:critics].min(0)
        cost_target = batch["cost_return"] + batch["bootstrap_discount"] * next_q[critics:]

        def loss_fn(params):
            q_values = critic.apply(params, batch["obs"], batch["actions"])
            reward_loss = jnp.mean((q_values[:critics] - reward_target) ** 2)
            cost_loss = jnp.mean((q_values[critics:] - cost_target) ** 2)
            return reward_loss + cost_loss, (reward_loss, cost_loss)

        (_, (reward_loss, cost_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic.params)
        critic_state = state.critic.apply_gradients(grads=grads)
        target = optax.incremental_update(critic_state.params, state.target_critic_params, args.tau)
        metrics = {"losses/critic_reward": reward_loss, "losses/critic_cost": cost_loss}
        return state.replace(critic=critic_state, target_critic_params=target), metrics

    def estep(state, obs, key):
        """Sample K actions per state from pi_old, solve the dual, return the weights q(a_k|s)."""
        mean_old, std_old = actor.apply(state.old_actor_params, obs)
        noise = jax.random.normal(key, (obs.shape[0], args.num_sampled_actions, mean_old.shape[-1]))
        sampled = mean_old[:, None] + std_old[:, None] * noise  # (B, K, A)
        q_reward, q_cost = reward_and_cost(  # (B, K) each
            critic.apply(state.critic.params, obs[:, None], jnp.clip(sampled, action_low, action_high)))
        if args.estep_solver == "newton":
            duals, cost_temperature, logits, infeasible, iterations, kkt_residual = solve_estep(
                state.duals, state.cost_temperature, q_reward, q_cost, args.estep_kl, eps_cost,
                args.estep_max_iterations, args.estep_tolerance, args.estep_dual_min, args.estep_dual_max)
            dual_opt_state = state.dual_opt_state
        else:
            # FSRL: one Adam step on (eta, lambda) themselves, clipped to the bounds, state kept across updates.
            grad = jax.grad(estep_dual)(state.duals, q_reward, q_cost, args.estep_kl, eps_cost)
            update, dual_opt_state = dual_optimizer.update(grad, state.dual_opt_state)
            duals = jnp.clip(state.duals + update, args.estep_dual_min, args.estep_dual_max)
            _, slack, _ = estep_dual_derivatives(duals, q_reward, q_cost, args.estep_kl, eps_cost)
            kkt_residual = estep_kkt_residual(slack, duals <= args.estep_dual_min, duals >= args.estep_dual_max,
                                              args.estep_kl, eps_cost, q_cost)
            logits, cost_temperature = (q_reward - duals[1] * q_cost) / duals[0], state.cost_temperature
            infeasible, iterations = duals[1] >= args.estep_dual_max, jnp.ones((), jnp.int32)
        log_weights = jax.nn.log_softmax(logits, axis=1)
        weights = jnp.exp(log_weights)
        metrics = {
            "losses/estep_dual": estep_dual(duals, q_reward, q_cost, args.estep_kl, eps_cost),
            "charts/estep_eta": duals[0], "charts/estep_lambda": duals[1], "estep/solver_iterations": iterations,
            "estep/kkt_residual": kkt_residual, "estep/infeasible": infeasible.astype(jnp.float32),
            "estep/kl_q_pi_old": jnp.mean(jnp.sum(weights * (log_weights + jnp.log(args.num_sampled_actions)), axis=1)),
            "estep/q_cost": jnp.mean(jnp.sum(weights * q_cost, axis=1)), "estep/q_cost_pi_old": jnp.mean(q_cost),
            "estep/q_reward": jnp.mean(jnp.sum(weights * q_reward, axis=1)),
        }
        if args.estep_solver == "newton":  # FSRL's solver has no least-cost temperature
            metrics["estep/cost_temperature"] = cost_temperature
        state = state.replace(duals=jax.lax.stop_gradient(duals), cost_temperature=cost_temperature,
                              dual_opt_state=dual_opt_state)
        return state, sampled, jax.lax.stop_gradient(weights), metrics

    def mstep(state, obs, sampled, weights):
        """Weighted maximum likelihood inside the decoupled KL trust region around pi_old.

        One Adam step on L_mle + alpha_mu KL_mu + alpha_sigma KL_sigma, then a backtracking line search that halves
        the step until neither KL exceeds its bound on this batch (or, if the actor already lies outside, exceeds
        it by more than before). Each multiplier follows dual ascent in log space on the KL that the full step
        would reach: it grows by up to e^lr per update while that KL exceeds its bound, and shrinks otherwise.
        """
        mean_old, std_old = actor.apply(state.old_actor_params, obs)
        kl_of = lambda mean, std: decoupled_gaussian_kl(mean_old, std_old, mean, std, args.mstep_kl_std_floor)
        kl_at = lambda params: jnp.stack(kl_of(*actor.apply(params, obs)))
        alphas = jnp.exp(state.mstep_log_alphas)

        def loss_fn(params):
            mean, std = actor.apply(params, obs)
            log_likelihood = (gaussian_log_prob(sampled, mean[:, None], std_old[:, None])
                              + gaussian_log_prob(sampled, mean_old[:, None], std[:, None]))  # (B, K)
            mle_loss = -jnp.mean(jnp.sum(weights * log_likelihood, axis=1))
            kl_mean, kl_std = kl_of(mean, std)
            return mle_loss + alphas[0] * kl_mean + alphas[1] * kl_std, mle_loss

        params = state.actor.params
        (actor_loss, mle_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = state.actor.tx.update(grads, state.actor.opt_state, params)
        stepped = lambda step: optax.apply_updates(params, jax.tree.map(lambda u: step * u, updates))
        kl_now, kl_full_step = kl_at(params), kl_at(stepped(1.0))
        allowed = jnp.maximum(1.0, jnp.max(kl_now / mstep_bounds))
        step = jax.lax.while_loop(lambda step: (step > 0) & (jnp.max(kl_at(stepped(step)) / mstep_bounds) > allowed),
                                  lambda step: jnp.where(step > 2.0**-10, step / 2, 0.0), 1.0)
        log_alphas = jnp.clip(
            state.mstep_log_alphas + args.mstep_dual_lr * jnp.clip(kl_full_step / mstep_bounds - 1, -1, 1),
            *log_alpha_bounds)
        actor_state = state.actor.replace(step=state.actor.step + 1, params=stepped(step), opt_state=opt_state)
        state = state.replace(actor=actor_state, mstep_log_alphas=log_alphas)
        metrics = {"losses/actor": actor_loss, "losses/mstep_mle": mle_loss, "mstep/kl_mu": kl_now[0],
                   "mstep/kl_sigma": kl_now[1], "mstep/alpha_mu": alphas[0], "mstep/alpha_sigma": alphas[1],
                   "mstep/step_fraction": step}
        return state, metrics

    @jax.jit
    def train_round(state, batches, key):
        """One round: critic, E-step and M-step updates scanned over the batches; then pi_old <- actor.

        The critics learn on the batches' transitions, the E-step and M-step on their policy_obs."""

        def one_update(state, inputs):
            batch, update_key = inputs
            critic_key, estep_key = jax.random.split(update_key)
            state, critic_metrics = update_critics(state, batch, critic_key)
            state, sampled, weights, estep_metrics = estep(state, batch["policy_obs"], estep_key)
            state, mstep_metrics = mstep(state, batch["policy_obs"], sampled, weights)
            return state, {**critic_metrics, **estep_metrics, **mstep_metrics}

        num_updates = batches["obs"].shape[0]
        state, metrics = jax.lax.scan(one_update, state, (batches, jax.random.split(key, num_updates)))
        summary = {**jax.tree.map(jnp.mean, metrics), **{f"{name}_max": jnp.max(metrics[name]) for name in ROUND_MAXIMA}}
        return state.replace(old_actor_params=state.actor.params), summary

    def init_state(key, obs_dim, action_dim):
        actor_key, critic_key = jax.random.split(key)
        dummy_obs, dummy_action = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        actor_params = actor.init(actor_key, dummy_obs)
        critic_params = critic.init(critic_key, dummy_obs, dummy_action)
        initial_lambda = 0.0 if args.estep_solver == "newton" else args.estep_dual_min  # FSRL clamps at its bound
        duals = jnp.array([1.0, initial_lambda])
        return CVPOState(
            actor=TrainState.create(apply_fn=actor.apply, params=actor_params, tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            target_critic_params=critic_params, old_actor_params=actor_params, duals=duals,
            cost_temperature=jnp.ones(()),
            dual_opt_state=dual_optimizer.init(duals), mstep_log_alphas=jnp.zeros(2))

    return CVPOUpdates(update_critics, estep, mstep, train_round, init_state)


def evaluate(actor, actor_params, env_thunk, episodes, seed):
    """Mean return and cost of the deterministic policy (the mean action) over whole episodes."""
    env = env_thunk()
    policy = jax.jit(lambda params, obs: actor.apply(params, obs)[0])
    low, high = env.action_space.low, env.action_space.high
    returns, costs = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, episode_return, episode_cost = False, 0.0, 0.0
        while not done:
            action = np.clip(np.asarray(policy(actor_params, obs[None].astype(np.float32)))[0], low, high)
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
    if args.estep_dual_max is None:
        args.estep_dual_max = 1e5 if args.estep_solver == "newton" else 20.0
    validate_args(args)
    checkpoint = None
    if args.resume or args.eval_checkpoint:
        checkpoint = load_checkpoint(args.resume or args.eval_checkpoint)
        args = args_from_checkpoint(checkpoint, args)
        run_name = checkpoint["run_name"]
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume or args.eval_checkpoint)))
    else:
        run_name = f"{args.env_id.split(':')[-1]}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)

    probe_env = make_env(args.env_id, args.seed)()
    if not isinstance(probe_env.action_space, gym.spaces.Box) or len(probe_env.observation_space.shape) != 1:
        fail("CVPO needs a flat Box observation space and a Box action space")
    obs_dim, action_dim = probe_env.observation_space.shape[0], probe_env.action_space.shape[0]
    action_low, action_high = probe_env.action_space.low, probe_env.action_space.high
    if args.episode_length is None:
        args.episode_length = probe_env.spec.max_episode_steps if probe_env.spec else None
        if not args.episode_length:
            fail(f"{args.env_id} has no max_episode_steps; pass --episode-length for the cost threshold")
    if args.update_interval is None:
        args.update_interval = 10 * args.episode_length
    if args.learning_starts is None:
        args.learning_starts = args.update_interval
    if args.policy_state_window is None:
        args.policy_state_window = min(args.update_interval, args.buffer_size)
    probe_env.close()
    if not args.eval_checkpoint:  # forked env workers must start before JAX starts its threads
        envs_class = gym.vector.AsyncVectorEnv if args.async_envs and args.num_envs > 1 else gym.vector.SyncVectorEnv
        envs = envs_class([make_env(args.env_id, args.seed + i) for i in range(args.num_envs)])
    eval_render_mode = "rgb_array" if args.capture_video else None

    def eval_env_thunk(name):
        thunk = make_env(args.env_id, args.seed + 10_000, eval_render_mode)
        if not args.capture_video:
            return thunk
        return lambda: gym.wrappers.RecordVideo(thunk(), os.path.join(run_dir, "videos"), name_prefix=name,
                                                episode_trigger=lambda _: True, disable_logger=True)

    actor = Actor(action_dim, tuple(args.hidden_sizes), *mean_bounds(action_low, action_high, args.mean_bound))
    critic = CriticEnsemble(tuple(args.hidden_sizes), 2 if args.double_critic else 1)
    eps_cost = cost_threshold(args.cost_limit, args.gamma, args.episode_length)
    updates = make_train_round(args, actor, critic, action_low, action_high, eps_cost)
    key = jax.random.PRNGKey(args.seed)
    key, init_key = jax.random.split(key)
    state = updates.init_state(init_key, obs_dim, action_dim)

    if args.eval_checkpoint:
        actor_params = flax.serialization.from_state_dict(state, checkpoint["state"]).actor.params
        mean_return, mean_cost = evaluate(actor, actor_params, eval_env_thunk("checkpoint"), args.eval_episodes,
                                          args.seed + 10_000)
        result = {"checkpoint": args.eval_checkpoint, "global_step": checkpoint["global_step"],
                  "episodes": args.eval_episodes, **evaluation_metrics(mean_return, mean_cost, args.cost_limit)}
        print(json.dumps(result))
        return result

    buffer = ReplayBuffer(args.buffer_size, args.num_envs, obs_dim, action_dim)
    rng = np.random.default_rng(args.seed)
    global_step = 0
    if checkpoint is not None:
        state = flax.serialization.from_state_dict(state, checkpoint["state"])
        key, global_step = jnp.asarray(checkpoint["key"]), checkpoint["global_step"]
        buffer.data, buffer.position, buffer.full = checkpoint["buffer"], checkpoint["buffer_position"], checkpoint["buffer_full"]
        rng.bit_generator.state = checkpoint["rng_state"]
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
            "rng_state": rng.bit_generator.state})

    @jax.jit
    def sample_actions(params, obs, key):
        mean, std = actor.apply(params, obs)
        return mean + std * jax.random.normal(key, mean.shape)

    @jax.jit
    def cost_q(params, obs, actions):  # what the E-step uses: the largest of the cost critics
        return critic.apply(params, obs, actions)[critic.critics_per_signal:].max(0)

    updates_per_round = max(1, round(args.update_interval * args.updates_per_step))
    rows_per_round = max(1, args.update_interval // args.num_envs)
    policy_state_rows = max(1, args.policy_state_window // args.num_envs)

    def finish_round(round_in_flight):
        """Wait for a dispatched round, check and log its metrics, and return the state it produced."""
        state_before, state_after, metrics = round_in_flight
        metrics = jax.device_get(metrics)
        metrics.update(cost_critic_bias(buffer, rows_per_round, args.gamma,
                                        lambda obs, actions: cost_q(state_after.critic.params, obs, actions)))
        not_finite = sorted((not name.startswith("losses/"), name) for name, value in metrics.items()
                            if not np.isfinite(value))  # a loss first: the others follow from it
        if not_finite:
            name, others = not_finite[0][1], len(not_finite) - 1
            path = write_checkpoint(state_before, global_step)
            fail(f"{name} became {metrics[name]} at global step {global_step}"
                 f"{f' (and {others} other metrics)' if others else ''}; last finite state saved to {path}")
        sps = (global_step - start_step) / (time.time() - start_time)
        logger.log({**metrics, "charts/estep_cost_threshold": eps_cost, "charts/SPS": sps}, global_step)
        progress.set_postfix(ret=f"{np.mean(recent['return'] or [0]):.1f}",
                             cost=f"{np.mean(recent['cost'] or [0]):.1f}", sps=f"{sps:.0f}")
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
            env_actions = np.clip(actions, action_low, action_high)
            next_obs, rewards, terminations, truncations, infos = envs.step(env_actions)
            costs = step_costs(infos, args.num_envs)
            ended = terminations | truncations
            real_next_obs = next_obs.copy()
            for i in np.flatnonzero(ended):
                real_next_obs[i] = infos["final_observation"][i]
            buffer.add(obs=obs, actions=env_actions, rewards=rewards, costs=costs, next_obs=real_next_obs,
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
                recent["return"] = (recent["return"] + list(episode_returns[ended]))[-20:]
                recent["cost"] = (recent["cost"] + list(episode_costs[ended]))[-20:]
                progress.set_postfix(ret=f"{np.mean(recent['return']):.1f}", cost=f"{np.mean(recent['cost']):.1f}")
                episode_returns[ended], episode_costs[ended], episode_lengths[ended] = 0.0, 0.0, 0

            if global_step >= args.learning_starts and global_step // args.update_interval > previous_step // args.update_interval:
                if round_in_flight is not None:
                    state, round_in_flight = finish_round(round_in_flight), None
                batches = buffer.sample_n_step(rng, (updates_per_round, args.batch_size), args.n_step, args.gamma)
                batches["policy_obs"] = buffer.sample_recent_obs(rng, (updates_per_round, args.batch_size),
                                                                 policy_state_rows)
                key, round_key = jax.random.split(key)
                # JAX dispatches the round and returns at once: with overlap it runs while the envs step
                round_in_flight = (state, *updates.train_round(state, batches, round_key))
                if not args.overlap_learning:
                    state, round_in_flight = finish_round(round_in_flight), None
                acting_params = state.actor.params

            if args.eval_every and global_step // args.eval_every > previous_step // args.eval_every:
                mean_return, mean_cost = evaluate(actor, acting_params, eval_env_thunk(f"step{global_step}"),
                                                  args.eval_episodes, args.seed + 10_000)
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
    mean_return, mean_cost = evaluate(actor, state.actor.params, eval_env_thunk("final"), args.eval_episodes,
                                      args.seed + 10_000)
    logger.log(evaluation_metrics(mean_return, mean_cost, args.cost_limit), global_step)
    if args.save_model:
        print(f"checkpoint written to {write_checkpoint(state, global_step)}")
    logger.close()
    print(f"{run_name}: eval return {mean_return:.2f}, eval cost {mean_cost:.2f} over {args.eval_episodes} episodes")
    return state


if __name__ == "__main__":
    main(tyro.cli(Args))
