# CVPO: Constrained Variational Policy Optimization (Liu et al., ICML 2022, arXiv:2201.11927).
# Docs: README.md, section "cvpo_jax.py". One file, jitted end to end: critics, E-step, M-step.
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
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint for --eval-episodes episodes instead of training"""
    eval_every: int = 100_000
    """env steps between evaluations of the deterministic policy (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    env_id: str = "SafetyPointGoal1-v0"
    """a Safety-Gymnasium task id, or a Gymnasium id (also `module:Env-v0`) that reports info["cost"]"""
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
    learning_starts: int = 10_000
    """env steps collected before the first update"""
    updates_per_step: float = 0.2
    """gradient updates per env step"""
    update_interval: int = 2_000
    """env steps per round; a round runs its updates in one jitted scan, then refreshes pi_old"""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """hidden layers of the actor and of each critic"""
    double_critic: bool = False
    """twin critics: min of two reward critics, max of two cost critics"""
    critic_lr: float = 1e-3
    """learning rate of the critics"""
    actor_lr: float = 5e-4
    """learning rate of the actor (M-step)"""
    num_sampled_actions: int = 16
    """K: actions sampled from pi_old per state in the E-step"""
    estep_kl: float = 0.02
    """eps_kl: bound on KL(q || pi_old) in the E-step"""
    estep_solver: Literal["converge", "fsrl"] = "converge"
    """converge: solve the E-step dual to tolerance each update; fsrl: one Adam step per update (FSRL)"""
    estep_dual_lr: float = 0.1
    """Adam rate on the duals: on log(eta, lambda) for converge, on (eta, lambda) for fsrl (which uses 0.02)"""
    estep_max_iterations: int = 200
    """iteration cap of the converge solver"""
    estep_tolerance: float = 1e-4
    """the converge solver stops when no log-dual moves more than this"""
    estep_dual_min: float = 1e-6
    """lower bound of eta and lambda"""
    estep_dual_max: float = 20.0
    """upper bound of eta and lambda"""
    mstep_kl_mu: float = 0.005
    """eps_mu: bound on the KL of the mean in the M-step"""
    mstep_kl_sigma: float = 0.0005
    """eps_sigma: bound on the KL of the standard deviation in the M-step"""
    mstep_dual_lr: float = 0.1
    """Adam rate of the M-step multipliers alpha_mu, alpha_sigma (reset to 0 each round)"""
    mstep_dual_max: float = 0.5
    """upper bound of the M-step multipliers"""
    episode_length: Optional[int] = None
    """episode length T for the cost threshold (computed at run time from the env spec when unset)"""


# Flags that may differ between a run and its resumption; every other flag comes from the checkpoint.
SESSION_FLAGS = ("total_timesteps", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model",
                 "checkpoint_every", "eval_every", "eval_episodes", "async_envs")


def fail(message):
    sys.exit(f"error: {message}")


def is_safety_gymnasium_id(env_id):
    return env_id in safety_gymnasium.utils.registration.safe_registry


def check_env_id(env_id):
    if ":" in env_id:
        module = env_id.split(":")[0]
        try:
            __import__(module)
        except ImportError as error:
            fail(f"cannot import module {module!r} of env id {env_id!r}: {error}")
        env_id = env_id.split(":", 1)[1]
    if env_id not in gym.envs.registry:
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
    for name in ("batch_size", "buffer_size", "n_step", "update_interval", "updates_per_step", "num_sampled_actions",
                 "critic_lr", "actor_lr", "estep_kl", "estep_dual_lr", "estep_max_iterations", "mstep_kl_mu",
                 "mstep_kl_sigma", "mstep_dual_lr", "mstep_dual_max", "eval_episodes", "checkpoint_every"):
        if not getattr(args, name) > 0:
            fail(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("learning_starts", "eval_every", "estep_tolerance"):
        if getattr(args, name) < 0:
            fail(f"{flag(name)} must be non-negative, got {getattr(args, name)}")
    if not 0 < args.gamma < 1:
        fail(f"--gamma must be in (0, 1) (the cost threshold divides by 1 - gamma), got {args.gamma}")
    if not 0 < args.tau <= 1:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    if not 0 < args.estep_dual_min < args.estep_dual_max:
        fail(f"need 0 < --estep-dual-min < --estep-dual-max, got {args.estep_dual_min}, {args.estep_dual_max}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        fail(f"--hidden-sizes must be one or more positive layer widths, got {args.hidden_sizes}")
    if args.episode_length is not None and args.episode_length <= 0:
        fail(f"--episode-length must be positive, got {args.episode_length}")
    for path in (args.resume, args.eval_checkpoint):
        if path is not None and not os.path.isfile(path):
            fail(f"no checkpoint file at {path}")
    check_env_id(args.env_id)


def make_env(env_id, seed, render_mode=None):
    is_safety_task = is_safety_gymnasium_id(env_id)

    def thunk():
        if is_safety_task:
            # A spawned env worker imports the package afresh, so it goes through the workaround too.
            safety_gym = import_safety_gymnasium()
            # Navigation tasks render from the agent's own eyes by default; videos follow it from above instead.
            camera = {"camera_name": "track"} if render_mode and "Velocity" not in env_id else {}
            env = safety_gym.make(env_id, render_mode=render_mode, **camera)
            env = safety_gym.wrappers.SafetyGymnasium2Gymnasium(env)
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


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Actor(nn.Module):
    """Diagonal Gaussian with a state-dependent standard deviation; the mean is unbounded."""

    action_dim: int
    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs):
        x = obs
        for size in self.hidden_sizes:
            x = nn.relu(nn.Dense(size)(x))
        mean = nn.Dense(self.action_dim)(x)
        log_std = jnp.clip(nn.Dense(self.action_dim)(x), LOG_STD_MIN, LOG_STD_MAX)
        return mean, jnp.exp(log_std)


class QNetwork(nn.Module):
    hidden_sizes: tuple

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        for size in self.hidden_sizes:
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
    log_duals: jax.Array  # log(eta), log(lambda): the E-step duals, warm-started across updates
    dual_opt_state: optax.OptState  # used by the fsrl solver only
    mstep_alphas: jax.Array  # alpha_mu, alpha_sigma
    mstep_alpha_opt_state: optax.OptState


def gaussian_log_prob(x, mean, std):
    return jnp.sum(-0.5 * ((x - mean) / std) ** 2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def decoupled_gaussian_kl(mean_old, std_old, mean, std):
    """MPO's decoupled KL(pi_old || pi): the mean part (std fixed to std_old) and the std part (mean fixed)."""
    kl_mean = jnp.mean(jnp.sum((mean_old - mean) ** 2 / (2 * std_old**2), axis=-1))
    kl_std = jnp.mean(jnp.sum(0.5 * (2 * jnp.log(std / std_old) + std_old**2 / std**2 - 1), axis=-1))
    return kl_mean, kl_std


def estep_dual(log_duals, q_reward, q_cost, eps_kl, eps_cost):
    """g(eta, lambda) on (B, K) Q values; its minimiser gives q(a_k|s) = softmax_k((Q_r - lambda Q_c) / eta)."""
    eta, lagrange = jnp.exp(log_duals[0]), jnp.exp(log_duals[1])
    scaled = (q_reward - lagrange * q_cost) / eta
    log_mean_exp = jax.nn.logsumexp(scaled, axis=1) - jnp.log(q_reward.shape[1])
    return eta * eps_kl + lagrange * eps_cost + eta * jnp.mean(log_mean_exp)


def solve_estep_dual(log_duals, q_reward, q_cost, eps_kl, eps_cost, learning_rate, max_iterations, tolerance,
                     dual_min, dual_max):
    """Projected Adam on log(eta, lambda), warm-started, until no coordinate moves more than tolerance."""
    optimizer = optax.adam(learning_rate)
    bounds = jnp.log(dual_min), jnp.log(dual_max)

    def not_converged(carry):
        _, _, iteration, largest_move = carry
        return (iteration < max_iterations) & (largest_move > tolerance)

    def adam_step(carry):
        x, opt_state, iteration, _ = carry
        grad = jax.grad(estep_dual)(x, q_reward, q_cost, eps_kl, eps_cost)
        update, opt_state = optimizer.update(grad, opt_state)
        new_x = jnp.clip(x + update, *bounds)
        return new_x, opt_state, iteration + 1, jnp.max(jnp.abs(new_x - x))

    x = jnp.clip(log_duals, *bounds)
    x, _, iterations, _ = jax.lax.while_loop(not_converged, adam_step, (x, optimizer.init(x), 0, jnp.inf))
    return x, iterations


def cost_threshold(cost_limit, gamma, episode_length):
    """The episodic budget d as a per-state bound on Q_c: d (1 - gamma^T) / ((1 - gamma) T)."""
    return cost_limit * (1 - gamma**episode_length) / ((1 - gamma) * episode_length)


def make_train_round(args, actor, critic, action_low, action_high, eps_cost):
    critics = 2 if args.double_critic else 1
    dual_optimizer = optax.adam(args.estep_dual_lr)
    alpha_optimizer = optax.adam(args.mstep_dual_lr)
    mstep_bounds = jnp.array([args.mstep_kl_mu, args.mstep_kl_sigma])

    def reward_and_cost(q_values):
        return q_values[:critics].min(0), q_values[critics:].max(0)

    def update_critics(state, batch, key):
        mean, std = actor.apply(state.actor.params, batch["bootstrap_obs"])
        next_actions = jnp.clip(mean + std * jax.random.normal(key, mean.shape), action_low, action_high)
        next_reward_q, next_cost_q = reward_and_cost(
            critic.apply(state.target_critic_params, batch["bootstrap_obs"], next_actions))
        reward_target = batch["reward_return"] + batch["bootstrap_discount"] * next_reward_q
        cost_target = batch["cost_return"] + batch["bootstrap_discount"] * next_cost_q

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
        repeated_obs = jnp.broadcast_to(obs[:, None], (*sampled.shape[:2], obs.shape[-1]))
        q_reward, q_cost = reward_and_cost(  # (B, K) each
            critic.apply(state.critic.params, repeated_obs, jnp.clip(sampled, action_low, action_high)))
        if args.estep_solver == "converge":
            log_duals, iterations = solve_estep_dual(
                state.log_duals, q_reward, q_cost, args.estep_kl, eps_cost, args.estep_dual_lr,
                args.estep_max_iterations, args.estep_tolerance, args.estep_dual_min, args.estep_dual_max)
            dual_opt_state = state.dual_opt_state
        else:
            # FSRL: one Adam step on (eta, lambda) themselves, clipped to the bounds, state kept across updates.
            duals = jnp.exp(state.log_duals)
            grad = jax.grad(lambda d: estep_dual(jnp.log(d), q_reward, q_cost, args.estep_kl, eps_cost))(duals)
            update, dual_opt_state = dual_optimizer.update(grad, state.dual_opt_state)
            log_duals = jnp.log(jnp.clip(duals + update, args.estep_dual_min, args.estep_dual_max))
            iterations = jnp.ones((), jnp.int32)
        eta, lagrange = jnp.exp(log_duals)
        weights = jax.nn.softmax((q_reward - lagrange * q_cost) / eta, axis=1)
        kl_q = jnp.mean(jnp.sum(weights * jnp.log(weights * args.num_sampled_actions + 1e-12), axis=1))
        metrics = {
            "losses/estep_dual": estep_dual(log_duals, q_reward, q_cost, args.estep_kl, eps_cost),
            "charts/estep_eta": eta, "charts/estep_lambda": lagrange, "estep/solver_iterations": iterations,
            "estep/kl_q_pi_old": kl_q, "estep/q_cost": jnp.mean(jnp.sum(weights * q_cost, axis=1)),
            "estep/q_cost_pi_old": jnp.mean(q_cost), "estep/q_reward": jnp.mean(jnp.sum(weights * q_reward, axis=1)),
        }
        state = state.replace(log_duals=jax.lax.stop_gradient(log_duals), dual_opt_state=dual_opt_state)
        return state, sampled, jax.lax.stop_gradient(weights), metrics

    def mstep(state, obs, sampled, weights):
        """Weighted maximum likelihood inside the decoupled KL trust region around pi_old."""
        mean_old, std_old = actor.apply(state.old_actor_params, obs)
        kl_of = lambda params: decoupled_gaussian_kl(mean_old, std_old, *actor.apply(params, obs))
        kl_now = jnp.stack(kl_of(state.actor.params))
        # The multipliers rise while their KL exceeds its bound: minimise alpha * (eps - KL).
        alpha_update, alpha_opt_state = alpha_optimizer.update(mstep_bounds - kl_now, state.mstep_alpha_opt_state)
        alphas = jnp.clip(state.mstep_alphas + alpha_update, 0.0, args.mstep_dual_max)

        def loss_fn(params):
            mean, std = actor.apply(params, obs)
            log_likelihood = (gaussian_log_prob(sampled, mean[:, None], std_old[:, None])
                              + gaussian_log_prob(sampled, mean_old[:, None], std[:, None]))  # (B, K)
            mle_loss = -jnp.mean(weights * log_likelihood)
            kl_mean, kl_std = decoupled_gaussian_kl(mean_old, std_old, mean, std)
            trust_region = alphas[0] * (kl_mean - args.mstep_kl_mu) + alphas[1] * (kl_std - args.mstep_kl_sigma)
            return mle_loss + trust_region, (mle_loss, kl_mean, kl_std)

        (actor_loss, (mle_loss, kl_mean, kl_std)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.actor.params)
        state = state.replace(actor=state.actor.apply_gradients(grads=grads), mstep_alphas=alphas,
                              mstep_alpha_opt_state=alpha_opt_state)
        metrics = {"losses/actor": actor_loss, "losses/mstep_mle": mle_loss, "mstep/kl_mu": kl_mean,
                   "mstep/kl_sigma": kl_std, "mstep/alpha_mu": alphas[0], "mstep/alpha_sigma": alphas[1]}
        return state, metrics

    @jax.jit
    def train_round(state, batches, key):
        """One round: critic, E-step and M-step updates scanned over the batches; then pi_old <- actor."""
        zeros = jnp.zeros(2)
        state = state.replace(mstep_alphas=zeros, mstep_alpha_opt_state=alpha_optimizer.init(zeros))

        def one_update(state, inputs):
            batch, update_key = inputs
            critic_key, estep_key = jax.random.split(update_key)
            state, critic_metrics = update_critics(state, batch, critic_key)
            state, sampled, weights, estep_metrics = estep(state, batch["obs"], estep_key)
            state, mstep_metrics = mstep(state, batch["obs"], sampled, weights)
            return state, {**critic_metrics, **estep_metrics, **mstep_metrics}

        num_updates = batches["obs"].shape[0]
        state, metrics = jax.lax.scan(one_update, state, (batches, jax.random.split(key, num_updates)))
        return state.replace(old_actor_params=state.actor.params), jax.tree.map(jnp.mean, metrics)

    def init_state(key, obs_dim, action_dim):
        actor_key, critic_key = jax.random.split(key)
        dummy_obs, dummy_action = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        actor_params = actor.init(actor_key, dummy_obs)
        critic_params = critic.init(critic_key, dummy_obs, dummy_action)
        log_duals = jnp.log(jnp.array([1.0, args.estep_dual_min]))  # eta = 1, lambda at its lower bound (0)
        zeros = jnp.zeros(2)
        return CVPOState(
            actor=TrainState.create(apply_fn=actor.apply, params=actor_params, tx=optax.adam(args.actor_lr)),
            critic=TrainState.create(apply_fn=critic.apply, params=critic_params, tx=optax.adam(args.critic_lr)),
            target_critic_params=critic_params, old_actor_params=actor_params, log_duals=log_duals,
            dual_opt_state=dual_optimizer.init(jnp.exp(log_duals)), mstep_alphas=zeros,
            mstep_alpha_opt_state=alpha_optimizer.init(zeros))

    return train_round, init_state


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
        fail("CVPO needs a flat Box observation space and a Box action space")
    obs_dim, action_dim = probe_env.observation_space.shape[0], probe_env.action_space.shape[0]
    action_low, action_high = probe_env.action_space.low, probe_env.action_space.high
    if args.episode_length is None:
        args.episode_length = probe_env.spec.max_episode_steps if probe_env.spec else None
        if not args.episode_length:
            fail(f"{args.env_id} has no max_episode_steps; pass --episode-length for the cost threshold")
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
    critic = CriticEnsemble(tuple(args.hidden_sizes), 2 if args.double_critic else 1)
    eps_cost = cost_threshold(args.cost_limit, args.gamma, args.episode_length)
    train_round, init_state = make_train_round(args, actor, critic, action_low, action_high, eps_cost)
    key = jax.random.PRNGKey(args.seed)
    key, init_key = jax.random.split(key)
    state = init_state(init_key, obs_dim, action_dim)

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
    logger = MetricsLogger(run_dir, args, run_name)
    checkpoint_path = os.path.join(run_dir, "checkpoints", "checkpoint.pkl")

    def write_checkpoint(agent_state, step):
        return save_checkpoint(checkpoint_path, {
            "args": vars(args), "run_name": run_name, "global_step": step, "key": np.asarray(key),
            "state": flax.serialization.to_state_dict(jax.device_get(agent_state)), "buffer": buffer.data,
            "buffer_position": buffer.position, "buffer_full": buffer.full, "rng_state": rng.bit_generator.state})

    @jax.jit
    def sample_actions(params, obs, key):
        mean, std = actor.apply(params, obs)
        return mean + std * jax.random.normal(key, mean.shape)

    updates_per_round = max(1, round(args.update_interval * args.updates_per_step))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    obs, _ = envs.reset(seed=args.seed + global_step)
    episode_returns, episode_costs = np.zeros(args.num_envs), np.zeros(args.num_envs)
    episode_lengths = np.zeros(args.num_envs, np.int64)
    recent = {"return": [], "cost": []}
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=args.total_timesteps, initial=global_step, unit="step", disable=None)
    try:
        while global_step < args.total_timesteps:
            key, action_key = jax.random.split(key)
            actions = np.asarray(sample_actions(state.actor.params, obs.astype(np.float32), action_key))
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
                            "charts/cost_limit": args.cost_limit}, global_step)
                recent["return"] = (recent["return"] + list(episode_returns[ended]))[-20:]
                recent["cost"] = (recent["cost"] + list(episode_costs[ended]))[-20:]
                progress.set_postfix(ret=f"{np.mean(recent['return']):.1f}", cost=f"{np.mean(recent['cost']):.1f}")
                episode_returns[ended], episode_costs[ended], episode_lengths[ended] = 0.0, 0.0, 0

            if global_step >= args.learning_starts and global_step // args.update_interval > previous_step // args.update_interval:
                batches = buffer.sample_n_step(rng, (updates_per_round, args.batch_size), args.n_step, args.gamma)
                key, round_key = jax.random.split(key)
                previous_state = state
                state, metrics = train_round(state, batches, round_key)
                metrics = jax.device_get(metrics)
                for name, value in metrics.items():
                    if not np.isfinite(value):
                        path = write_checkpoint(previous_state, global_step)
                        fail(f"{name} became {value} at global step {global_step}; last finite state saved to {path}")
                sps = (global_step - start_step) / (time.time() - start_time)
                logger.log({**metrics, "charts/estep_cost_threshold": eps_cost, "charts/SPS": sps}, global_step)
                progress.set_postfix(ret=f"{np.mean(recent['return'] or [0]):.1f}",
                                     cost=f"{np.mean(recent['cost'] or [0]):.1f}", sps=f"{sps:.0f}")

            if args.eval_every and global_step // args.eval_every > previous_step // args.eval_every:
                mean_return, mean_cost = evaluate(actor, state.actor.params, eval_env_thunk(f"step{global_step}"),
                                                  args.eval_episodes, args.seed + 10_000)
                logger.log(evaluation_metrics(mean_return, mean_cost, args.cost_limit), global_step)
            if args.save_model and global_step // args.checkpoint_every > previous_step // args.checkpoint_every:
                write_checkpoint(state, global_step)
    except KeyboardInterrupt:
        path = write_checkpoint(state, global_step)
        progress.close()
        with contextlib.suppress(Exception):  # on Ctrl-C the env workers were interrupted too
            envs.close(terminate=True)
        logger.close()
        sys.exit(f"interrupted at global step {global_step}; resume with --resume {path}")
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
