# PPO-Lagrangian: PPO whose advantage trades reward against cost with a multiplier lambda learned from the
# episodic cost (Ray, Achiam & Amodei 2019, "Benchmarking Safe Exploration in Deep RL"), set by a PID controller
# (Stooke, Achiam & Abbeel, ICML 2020, arXiv:2007.03964) or by gradient ascent. Docs: README.md, section
# "ppo_lagrangian_jax.py".
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
    num_steps: int = 2_500
    """env steps per env in each rollout: 10,000 per update with 4 envs, 100 updates in the default budget"""
    gamma: float = 0.99
    """discount factor of rewards and costs"""
    gae_lambda: float = 0.95
    """lambda of GAE, for the reward and the cost advantages"""
    update_epochs: int = 40
    """passes over each rollout"""
    minibatch_size: int = 64
    """transitions per gradient step (a remainder of the rollout is left out of each shuffled pass)"""
    clip_coef: float = 0.2
    """PPO surrogate clipping range"""
    target_kl: float = 0.02
    """no further passes over a rollout once KL(pi_old || pi) on it exceeds this"""
    max_grad_norm: float = 40.0
    """gradient norm clip, per network"""
    actor_lr: float = 3e-4
    """learning rate of the policy"""
    critic_lr: float = 3e-4
    """learning rate of the reward and cost value networks"""
    anneal_lr: bool = True
    """decay the policy learning rate linearly to 0 over the run"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    critic_l2_coef: float = 0.001
    """L2 penalty on the value networks' weights (SafePO/OmniSafe critic norm)"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """tanh hidden layers of the policy and of each value network"""
    lagrangian_method: Literal["gradient", "pid"] = "pid"
    """how lambda follows the windowed episodic cost, once per rollout: Adam ascent or a PID controller"""
    lagrange_window: int = 100
    """the episodes, across rollouts, whose mean cost lambda follows (OmniSafe: 100)"""
    lagrange_init: float = 0.001
    """initial lambda (gradient method)"""
    lagrange_lr: float = 0.035
    """Adam learning rate of lambda (gradient method; OmniSafe's rate, which it pairs with 500 updates)"""
    pid_kp: float = 0.1
    """proportional gain of the PID multiplier (OmniSafe's CPPOPID)"""
    pid_ki: float = 0.01
    """integral gain of the PID multiplier (OmniSafe's CPPOPID)"""
    pid_kd: float = 0.01
    """derivative gain of the PID multiplier, on rises of the smoothed cost only (OmniSafe's CPPOPID)"""
    pid_cost_smoothing: float = 0.0
    """per-episode EMA factor of the cost seen by the P and D terms (0: the windowed cost itself, as FSRL)"""


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
    for name in ("num_steps", "update_epochs", "clip_coef", "target_kl", "max_grad_norm", "actor_lr", "critic_lr",
                 "lagrange_lr", "lagrange_window", "eval_episodes", "checkpoint_every"):
        if not getattr(args, name) > 0:
            fail(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("eval_every", "ent_coef", "critic_l2_coef", "lagrange_init", "pid_kp", "pid_ki", "pid_kd",
                 "progress_every"):
        if getattr(args, name) < 0:
            fail(f"{flag(name)} must be non-negative, got {getattr(args, name)}")
    for name in ("gamma", "gae_lambda"):
        if not 0 < getattr(args, name) <= 1:
            fail(f"{flag(name)} must be in (0, 1], got {getattr(args, name)}")
    if not 0 <= args.pid_cost_smoothing < 1:
        fail(f"--pid-cost-smoothing must be in [0, 1), got {args.pid_cost_smoothing}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive layer widths, got {args.hidden_sizes}")
    if not 0 < args.minibatch_size <= args.num_steps * args.num_envs:
        fail(f"--minibatch-size must be in 1..{args.num_steps * args.num_envs} (--num-steps x --num-envs), "
             f"got {args.minibatch_size}")
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


@flax.struct.dataclass
class ObsNormalizer:
    """Running mean and variance of the observations (Chan et al.'s parallel update)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def update_obs_normalizer(normalizer, obs):
    batch_mean, batch_var, batch_count = obs.mean(0), obs.var(0), obs.shape[0]
    delta, total = batch_mean - normalizer.mean, normalizer.count + batch_count
    mean = normalizer.mean + delta * batch_count / total
    m2 = normalizer.var * normalizer.count + batch_var * batch_count + delta**2 * normalizer.count * batch_count / total
    return ObsNormalizer(mean=mean, var=m2 / total, count=total)


def normalize_obs(normalizer, obs):
    """OmniSafe's normaliser: the standard deviation floored at 0.01, so that a feature that has barely varied yet is
    not blown up, and the result clipped to [-5, 5]."""
    return jnp.clip((obs - normalizer.mean) / jnp.maximum(jnp.sqrt(normalizer.var), 0.01), -5.0, 5.0)


@flax.struct.dataclass
class LagrangeState:
    multiplier: jax.Array  # lambda >= 0
    adam_state: optax.OptState  # gradient method
    pid_integral: jax.Array  # pid method: the projected sum of (episodic cost - limit)
    pid_smoothed_cost: jax.Array  # pid method
    cost_window: jax.Array  # the episodic costs of the last lagrange_window episodes, a ring buffer
    episodes_seen: jax.Array  # episodes ever added to the window


def init_lagrange(args):
    multiplier = jnp.asarray(args.lagrange_init, jnp.float32)
    return LagrangeState(multiplier=multiplier, adam_state=optax.adam(args.lagrange_lr).init(multiplier),
                         pid_integral=jnp.zeros(()), pid_smoothed_cost=jnp.asarray(args.cost_limit, jnp.float32),
                         cost_window=jnp.zeros(args.lagrange_window), episodes_seen=jnp.zeros((), jnp.int32))


def add_episode_costs(lagrange, episode_costs):
    window, seen = np.array(lagrange.cost_window), int(lagrange.episodes_seen)
    for cost in episode_costs:
        window[seen % len(window)] = cost
        seen += 1
    return lagrange.replace(cost_window=jnp.asarray(window), episodes_seen=jnp.asarray(seen, jnp.int32))


def window_mean_cost(lagrange):
    """The mean episodic cost over the window, which spans rollouts (OmniSafe feeds lambda the last 100 episodes)."""
    window = np.asarray(lagrange.cost_window)
    return float(np.mean(window[: min(int(lagrange.episodes_seen), len(window))]))


def gradient_lagrange_update(lagrange, episodic_cost, cost_limit, learning_rate):
    """One Adam step on lambda minimising -lambda (J_c - d), then projected to lambda >= 0 (SafePO, OmniSafe)."""
    gradient = -(jnp.asarray(episodic_cost, jnp.float32) - cost_limit)
    update, adam_state = optax.adam(learning_rate).update(gradient, lagrange.adam_state)
    return lagrange.replace(multiplier=jnp.maximum(lagrange.multiplier + update, 0.0), adam_state=adam_state)


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


def lagrange_update(lagrange, episodic_cost, num_episodes, args):
    """One step of lambda from the windowed episodic cost, by args.lagrangian_method."""
    if args.lagrangian_method == "gradient":
        return gradient_lagrange_update(lagrange, episodic_cost, args.cost_limit, args.lagrange_lr)
    multiplier, integral, smoothed_cost = pid_lagrange(
        lagrange.pid_integral, lagrange.pid_smoothed_cost, episodic_cost, num_episodes, args.cost_limit, args.pid_kp,
        args.pid_ki, args.pid_kd, args.pid_cost_smoothing)
    return lagrange.replace(multiplier=multiplier, pid_integral=integral, pid_smoothed_cost=smoothed_cost)


def compute_gae(rewards, values, last_values, final_values, terminations, truncations, gamma, gae_lambda):
    """GAE advantages and value targets, by a reverse scan over the time axis of (T, num_envs) arrays.

    The state after step t is valued by values[t + 1] (last_values after the last step), except where the
    episode ended: a termination bootstraps from nothing, a truncation from final_values[t], the value of the
    final observation (the next entry of values already belongs to the next episode).
    """
    next_values = jnp.concatenate([values[1:], last_values[None]])
    next_values = jnp.where(truncations, final_values, next_values) * (1.0 - terminations)
    deltas = rewards + gamma * next_values - values
    continues = 1.0 - jnp.maximum(terminations, truncations)

    def backward(advantage, step):
        delta, continuing = step
        advantage = delta + gamma * gae_lambda * continuing * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(last_values), (deltas, continues), reverse=True)
    return advantages, advantages + values


def mlp(x, hidden_sizes):
    for size in hidden_sizes:
        x = nn.tanh(nn.Dense(size, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
    return x


class Actor(nn.Module):
    """Diagonal Gaussian: the mean from the observation, a state-independent log standard deviation."""

    action_dim: int
    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs):
        mean = nn.Dense(self.action_dim, kernel_init=nn.initializers.orthogonal(0.01))(mlp(obs, self.hidden_sizes))
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return mean, jnp.broadcast_to(log_std, mean.shape)


class ValueNetwork(nn.Module):
    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs):
        return nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))(mlp(obs, self.hidden_sizes))[..., 0]


@flax.struct.dataclass
class PPOLagState:
    actor: TrainState
    reward_critic: TrainState
    cost_critic: TrainState
    obs_normalizer: ObsNormalizer
    lagrange: LagrangeState


def gaussian_log_prob(x, mean, log_std):
    return jnp.sum(-0.5 * ((x - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def gaussian_kl(mean_old, log_std_old, mean, log_std):
    """KL(pi_old || pi) of diagonal Gaussians, summed over action dimensions."""
    variance_ratio = jnp.exp(2 * (log_std_old - log_std))
    return jnp.sum(log_std - log_std_old + 0.5 * (variance_ratio + ((mean - mean_old) / jnp.exp(log_std)) ** 2 - 1),
                   axis=-1)


def make_train_iteration(args, actor, value_network):
    # The policy's learning rate lives in its optimiser state, so annealing it needs no recompilation.
    actor_tx = optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate)))(learning_rate=args.actor_lr)
    critic_tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.critic_lr))
    batch_size = args.num_steps * args.num_envs
    num_minibatches = batch_size // args.minibatch_size

    def init_state(key, obs_dim):
        actor_key, reward_key, cost_key = jax.random.split(key, 3)
        dummy_obs = jnp.zeros((1, obs_dim))
        critic = lambda critic_key: TrainState.create(apply_fn=value_network.apply, tx=critic_tx,
                                                      params=value_network.init(critic_key, dummy_obs))
        return PPOLagState(
            actor=TrainState.create(apply_fn=actor.apply, params=actor.init(actor_key, dummy_obs), tx=actor_tx),
            reward_critic=critic(reward_key), cost_critic=critic(cost_key),
            obs_normalizer=ObsNormalizer(mean=jnp.zeros(obs_dim), var=jnp.ones(obs_dim), count=jnp.asarray(1e-4)),
            lagrange=init_lagrange(args))

    def loss_fn(params, batch):
        actor_params, reward_params, cost_params = params
        mean, log_std = actor.apply(actor_params, batch["obs"])
        ratio = jnp.exp(gaussian_log_prob(batch["actions"], mean, log_std) - batch["logprobs"])
        clipped_ratio = jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
        policy_loss = -jnp.mean(jnp.minimum(ratio * batch["advantages"], clipped_ratio * batch["advantages"]))
        entropy = jnp.mean(jnp.sum(log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e), axis=-1))
        reward_loss = jnp.mean((value_network.apply(reward_params, batch["obs"]) - batch["reward_targets"]) ** 2)
        cost_loss = jnp.mean((value_network.apply(cost_params, batch["obs"]) - batch["cost_targets"]) ** 2)
        weight_norm = sum(jnp.sum(w**2) for w in jax.tree.leaves((reward_params, cost_params)))
        loss = policy_loss - args.ent_coef * entropy + reward_loss + cost_loss + args.critic_l2_coef * weight_norm
        return loss, {"losses/policy": policy_loss, "losses/value_reward": reward_loss, "losses/value_cost": cost_loss,
                      "losses/entropy": entropy, "losses/clipfrac": jnp.mean(jnp.abs(ratio - 1) > args.clip_coef)}

    def train_minibatch(state, minibatch):
        params = (state.actor.params, state.reward_critic.params, state.cost_critic.params)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, minibatch)
        state = state.replace(actor=state.actor.apply_gradients(grads=grads[0]),
                              reward_critic=state.reward_critic.apply_gradients(grads=grads[1]),
                              cost_critic=state.cost_critic.apply_gradients(grads=grads[2]))
        return state, metrics

    def train_epoch(state, batch, key):
        order = jax.random.permutation(key, batch_size)[: num_minibatches * args.minibatch_size]
        minibatches = jax.tree.map(lambda x: x[order].reshape(num_minibatches, args.minibatch_size, *x.shape[1:]),
                                   batch)
        state, metrics = jax.lax.scan(train_minibatch, state, minibatches)
        return state, jax.tree.map(jnp.mean, metrics)

    @jax.jit
    def train_iteration(state, rollout, learning_rate, key):
        """GAE on one rollout, then up to update_epochs shuffled passes over it, until the KL passes target_kl."""
        gae = lambda signal: compute_gae(
            rollout[f"{signal}s"], rollout[f"values_{signal}"], rollout[f"last_values_{signal}"],
            rollout[f"final_values_{signal}"], rollout["terminations"], rollout["truncations"], args.gamma,
            args.gae_lambda)
        (reward_advantages, reward_targets), (cost_advantages, cost_targets) = gae("reward"), gae("cost")
        # As SafePO/OmniSafe: reward advantages standardised, cost advantages only centred, so lambda keeps its scale.
        reward_advantages = (reward_advantages - reward_advantages.mean()) / (reward_advantages.std() + 1e-8)
        cost_advantages = cost_advantages - cost_advantages.mean()
        multiplier = state.lagrange.multiplier
        flat = lambda x: x.reshape(batch_size, *x.shape[2:])
        batch = {name: flat(rollout[name]) for name in ["obs", "actions", "logprobs"]}
        batch |= {"advantages": flat((reward_advantages - multiplier * cost_advantages) / (1 + multiplier)),
                  "reward_targets": flat(reward_targets), "cost_targets": flat(cost_targets)}
        opt_state = state.actor.opt_state
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})
        state = state.replace(actor=state.actor.replace(opt_state=opt_state))
        mean_old, log_std_old = actor.apply(state.actor.params, batch["obs"])
        no_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(train_epoch, state, batch, key)[1])

        def run_epoch(carry, epoch_key):
            state, kl, stopped = carry

            def train(state):
                state, metrics = train_epoch(state, batch, epoch_key)
                kl = jnp.mean(gaussian_kl(mean_old, log_std_old, *actor.apply(state.actor.params, batch["obs"])))
                return state, metrics, kl

            # Early stopping inside a scan: once the KL has passed its bound, the remaining epochs change nothing.
            state, metrics, kl = jax.lax.cond(stopped, lambda state: (state, no_metrics, kl), train, state)
            return (state, kl, stopped | (kl > args.target_kl)), (metrics, ~stopped)

        (state, kl, _), (metrics, trained) = jax.lax.scan(
            run_epoch, (state, jnp.zeros(()), jnp.zeros((), bool)), jax.random.split(key, args.update_epochs))
        metrics = jax.tree.map(lambda m: jnp.sum(m * trained) / jnp.sum(trained), metrics)
        return state, {**metrics, "losses/approx_kl": kl, "charts/update_epochs": jnp.sum(trained),
                       "charts/lagrange_multiplier": multiplier, "charts/learning_rate": learning_rate}

    return train_iteration, init_state


def evaluate(actor, actor_params, obs_normalizer, env_thunk, episodes, seed):
    """Mean return and cost of the deterministic policy (the mean action, clipped), with the normaliser frozen."""
    env = env_thunk()
    policy = jax.jit(lambda params, normalizer, obs: actor.apply(params, normalize_obs(normalizer, obs))[0])
    low, high = env.action_space.low, env.action_space.high
    returns, costs = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, episode_return, episode_cost = False, 0.0, 0.0
        while not done:
            action = np.asarray(policy(actor_params, obs_normalizer, obs[None].astype(np.float32)))[0]
            obs, reward, terminated, truncated, info = env.step(np.clip(action, low, high))
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
        fail("PPO-Lagrangian needs a flat Box observation space and a Box action space")
    obs_dim, action_dim = probe_env.observation_space.shape[0], probe_env.action_space.shape[0]
    action_low, action_high = probe_env.action_space.low, probe_env.action_space.high
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

    actor = Actor(action_dim, tuple(args.hidden_sizes))
    value_network = ValueNetwork(tuple(args.hidden_sizes))
    train_iteration, init_state = make_train_iteration(args, actor, value_network)
    key = jax.random.PRNGKey(args.seed)
    key, init_key = jax.random.split(key)
    state = init_state(init_key, obs_dim)

    if args.eval_checkpoint:
        state = flax.serialization.from_state_dict(state, checkpoint["state"])
        mean_return, mean_cost = evaluate(actor, state.actor.params, state.obs_normalizer,
                                          eval_env_thunk("checkpoint"), args.eval_episodes, args.seed + 10_000)
        result = {"checkpoint": args.eval_checkpoint, "global_step": checkpoint["global_step"],
                  "episodes": args.eval_episodes, **evaluation_metrics(mean_return, mean_cost, args.cost_limit)}
        print(json.dumps(result))
        return result

    global_step = 0
    if checkpoint is not None:
        state = flax.serialization.from_state_dict(state, checkpoint["state"])
        key, global_step = jnp.asarray(checkpoint["key"]), checkpoint["global_step"]
    logger = MetricsLogger(run_dir, args, run_name)
    checkpoint_path = os.path.join(run_dir, "checkpoints", "checkpoint.pkl")

    def write_checkpoint(agent_state, step):
        return save_checkpoint(checkpoint_path, {
            "args": vars(args), "run_name": run_name, "global_step": step, "key": np.asarray(key),
            "state": flax.serialization.to_state_dict(jax.device_get(agent_state))})

    update_lagrange = jax.jit(lambda lagrange, episodic_cost, num_episodes: lagrange_update(
        lagrange, episodic_cost, num_episodes, args))

    # Acting gets the networks' parameters alone: flattening the whole state, optimisers included, costs more.
    @jax.jit
    def values(params, normalizer, obs):
        _, reward_params, cost_params = params
        obs = normalize_obs(normalizer, obs)
        return value_network.apply(reward_params, obs), value_network.apply(cost_params, obs)

    @jax.jit
    def act(params, normalizer, obs, key):
        """Sample actions; the normaliser absorbs the observations first, and they are stored normalised."""
        key, noise_key = jax.random.split(key)
        normalizer = update_obs_normalizer(normalizer, obs)
        mean, log_std = actor.apply(params[0], normalize_obs(normalizer, obs))
        actions = mean + jnp.exp(log_std) * jax.random.normal(noise_key, mean.shape)
        return normalizer, key, (normalize_obs(normalizer, obs), actions, gaussian_log_prob(actions, mean, log_std),
                                 *values(params, normalizer, obs))

    rollout = {name: np.zeros((args.num_steps, args.num_envs, *shape), np.float32) for name, shape in [
        ("obs", (obs_dim,)), ("actions", (action_dim,)), ("logprobs", ()), ("values_reward", ()), ("values_cost", ()),
        ("rewards", ()), ("costs", ()), ("terminations", ()), ("truncations", ()), ("final_values_reward", ()),
        ("final_values_cost", ())]}

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
    mid_rollout = False
    try:
        while global_step < args.total_timesteps:
            if stop_signals:
                raise KeyboardInterrupt
            previous_step, previous_state, rollout_episode_costs = global_step, state, []
            mid_rollout = True
            params = (state.actor.params, state.reward_critic.params, state.cost_critic.params)
            for step in range(args.num_steps):
                normalizer, key, outputs = act(params, state.obs_normalizer, obs.astype(np.float32), key)
                state = state.replace(obs_normalizer=normalizer)
                for name, value in zip(["obs", "actions", "logprobs", "values_reward", "values_cost"],
                                       jax.device_get(outputs)):
                    rollout[name][step] = value
                actions = np.clip(rollout["actions"][step], action_low, action_high)
                next_obs, rewards, terminations, truncations, infos = envs.step(actions)
                costs = step_costs(infos, args.num_envs)
                ended = terminations | truncations
                if truncations.any():  # bootstrap a time limit from the observation the reset replaced
                    final_obs = next_obs.copy()
                    for i in np.flatnonzero(ended):
                        final_obs[i] = infos["final_observation"][i]
                    rollout["final_values_reward"][step], rollout["final_values_cost"][step] = jax.device_get(
                        values(params, state.obs_normalizer, final_obs.astype(np.float32)))
                rollout["rewards"][step], rollout["costs"][step] = rewards, costs
                rollout["terminations"][step], rollout["truncations"][step] = terminations, truncations
                obs = next_obs
                global_step += args.num_envs
                progress.update(args.num_envs)
                if progress.disable and time.time() >= next_report:
                    next_report = time.time() + args.progress_every
                    print(progress_line(global_step, args.total_timesteps, start_step, start_time, recent), flush=True)

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
                    rollout_episode_costs += list(episode_costs[ended])
                    recent["return"] = (recent["return"] + list(episode_returns[ended]))[-20:]
                    recent["cost"] = (recent["cost"] + list(episode_costs[ended]))[-20:]
                    progress.set_postfix(ret=f"{np.mean(recent['return']):.1f}", cost=f"{np.mean(recent['cost']):.1f}")
                    episode_returns[ended], episode_costs[ended], episode_lengths[ended] = 0.0, 0.0, 0

            mid_rollout = False
            last_values = values(params, state.obs_normalizer, obs.astype(np.float32))
            rollout["last_values_reward"], rollout["last_values_cost"] = last_values
            lagrange = add_episode_costs(state.lagrange, rollout_episode_costs)
            if lagrange.episodes_seen > 0:  # lambda moves before the policy update, once an episode has ended
                lagrange = update_lagrange(lagrange, window_mean_cost(lagrange), len(rollout_episode_costs))
            state = state.replace(lagrange=lagrange)
            learning_rate = args.actor_lr * (1 - previous_step / args.total_timesteps if args.anneal_lr else 1)
            key, train_key = jax.random.split(key)
            state, metrics = train_iteration(state, rollout, learning_rate, train_key)
            metrics = jax.device_get(metrics)
            for name, value in metrics.items():
                if not np.isfinite(value):
                    path = write_checkpoint(previous_state, previous_step)
                    fail(f"{name} became {value} at global step {global_step}; last finite state saved to {path}")
            sps = (global_step - start_step) / (time.time() - start_time)
            logger.log({**metrics, "charts/SPS": sps}, global_step)
            progress.set_postfix(ret=f"{np.mean(recent['return'] or [0]):.1f}",
                                 cost=f"{np.mean(recent['cost'] or [0]):.1f}", sps=f"{sps:.0f}")

            if args.eval_every and global_step // args.eval_every > previous_step // args.eval_every:
                mean_return, mean_cost = evaluate(actor, state.actor.params, state.obs_normalizer,
                                                  eval_env_thunk(f"step{global_step}"), args.eval_episodes,
                                                  args.seed + 10_000)
                logger.log(evaluation_metrics(mean_return, mean_cost, args.cost_limit), global_step)
            if args.save_model and global_step // args.checkpoint_every > previous_step // args.checkpoint_every:
                write_checkpoint(state, global_step)
    except KeyboardInterrupt:
        if mid_rollout:  # the env workers were interrupted too: the partial rollout is dropped with its steps
            state, global_step = previous_state, previous_step
        path = write_checkpoint(state, global_step)
        progress.close()
        with contextlib.suppress(Exception):  # on Ctrl-C the env workers were interrupted too
            envs.close(terminate=True)
        logger.close()
        sys.exit(f"interrupted at global step {global_step}; resume with --resume {path}")
    progress.close()
    envs.close()
    mean_return, mean_cost = evaluate(actor, state.actor.params, state.obs_normalizer, eval_env_thunk("final"),
                                      args.eval_episodes, args.seed + 10_000)
    logger.log(evaluation_metrics(mean_return, mean_cost, args.cost_limit), global_step)
    if args.save_model:
        print(f"checkpoint written to {write_checkpoint(state, global_step)}")
    logger.close()
    print(f"{run_name}: eval return {mean_return:.2f}, eval cost {mean_cost:.2f} over {args.eval_episodes} episodes")
    return state


if __name__ == "__main__":
    main(tyro.cli(Args))
