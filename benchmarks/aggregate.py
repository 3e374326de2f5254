"""Summarise a suite run by run_suite.py: results/learning.md and one return/cost plot per task.

    python benchmarks/aggregate.py                      # reads benchmarks/results/runs/*/metrics.jsonl
    python benchmarks/aggregate.py --results-dir /tmp/r --final-fraction 0.1 --grid-points 100

Per algorithm and task: the episodic return and cost of the training episodes in the last
--final-fraction of the env steps each run reached (mean over those episodes, then mean +- std over
seeds), the last evaluation of the deterministic policy, env steps reached, wall-clock minutes.
Plots: return and cost against env steps; each run's episodes are averaged in bins of a common grid,
then mean +- std over seeds per algorithm; the cost limit is a horizontal line on the cost plot.
"""

import argparse
import ast
import functools
import json
import os
import re
import shlex
import sys
import time
import tomllib
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from run_suite import ALGORITHM_SCRIPTS, HEARTBEAT_SECONDS, read_metrics_records, script_path  # noqa: E402  (a sibling script: benchmarks/ is on sys.path)

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = {"cvpo": "CVPO", "ppo_lagrangian": "PPO-Lag", "sac_lagrangian": "SAC-Lag", "fsrl_cvpo": "FSRL's CVPO"}


def suite_variants():
    """suite.toml's variants (a run directory's algorithm part may name one): name -> (base algorithm, its flags)."""
    with open(os.path.join(BENCHMARKS_DIR, "suite.toml"), "rb") as file:
        return {name: (variant["algorithm"], variant["args"])
                for name, variant in tomllib.load(file).get("variants", {}).items()}


VARIANTS = suite_variants()
NAMES.update({name: f"{NAMES[base]}, {' '.join(flags)}" for name, (base, flags) in VARIANTS.items()})

# Published figures, each with its budget and source. Only numbers we could read or verify are listed. "env_id" and
# "family" attach a figure to our cells (the same task and the same kind of method) in the reproduction summary.
FSRL_CURVES = "FSRL benchmark curves (github.com/liuzuxin/FSRL, README figures), read off the plot"
REFERENCES = [
    {"algorithm": "CVPO", "family": "cvpo", "task": "SafetyPointGoal1", "env_id": "SafetyPointGoal1-v0",
     "cost_limit": 25, "budget": "5M", "return": "~24", "cost": "~25-30", "source": FSRL_CURVES},
    {"algorithm": "PPO-Lag (OmniSafe PPOLag)", "family": "ppo_lagrangian", "task": "SafetyPointGoal1-v0",
     "env_id": "SafetyPointGoal1-v0", "cost_limit": 25,
     "budget": "10M", "return": "12.96 ± 6.95", "cost": "25.80 ± 34.99",
     "source": "OmniSafe benchmarks/on-policy/README.md, Table 2 (github.com/PKU-Alignment/omnisafe); budget from the "
               "table's caption; mean ± std over seeds and 10 evaluation iterations"},
    {"algorithm": "CVPO", "family": "cvpo", "task": "SafetyCarRun (Bullet)", "env_id": "SafetyCarRun-v0",
     "cost_limit": 10, "budget": "0.3M", "return": "~542", "cost": "~11", "source": FSRL_CURVES},
    {"algorithm": "CVPO", "family": "cvpo", "task": "SafetyCarCircle (Bullet)", "env_id": "SafetyCarCircle-v0",
     "cost_limit": 10, "budget": "1.5M", "return": "~433", "cost": "~5.5", "source": FSRL_CURVES},
    {"algorithm": "PPO-Lag (FSRL PPOL)", "family": "ppo_lagrangian", "task": "SafetyCarCircle (Bullet)",
     "env_id": "SafetyCarCircle-v0", "cost_limit": 10, "budget": "1.5M", "return": "~397", "cost": "~8-10",
     "source": FSRL_CURVES},
    {"algorithm": "SAC-Lag (FSRL SACL)", "family": "sac_lagrangian", "task": "SafetyCarCircle (Bullet)",
     "env_id": "SafetyCarCircle-v0", "cost_limit": 10, "budget": "1.5M", "return": "~334", "cost": "~8-10",
     "source": FSRL_CURVES},
    {"algorithm": "CVPO", "family": "cvpo", "task": "SafetyPointButton1", "env_id": None, "cost_limit": 25,
     "budget": "5M", "return": "~10", "cost": "~30-35", "source": FSRL_CURVES},
]
# Not found in a verifiable form: a SAC-Lag figure on SafetyPointGoal1-v0 (OmniSafe's off-policy tables cover only
# the Velocity tasks) and any PPO-Lag / SAC-Lag figure on SafetyCarCircle1-v0 or SafetyCarRun-v0.
# what CVPO is compared with, where present (every variant of CVPO among them)
BASELINES = ("ppo_lagrangian", "sac_lagrangian", "fsrl_cvpo", *(name for name, (base, _) in VARIANTS.items()
                                                                 if base == "cvpo"))


def load_records(path):
    """Metrics records in file order; records logged again after a resume replace the earlier ones."""
    records = []
    for record in read_metrics_records(path):
        step = record.get("global_step", 0)
        if records and step < records[-1]["global_step"]:  # a resume from an earlier checkpoint
            while records and records[-1]["global_step"] >= step:
                records.pop()
        records.append(record)
    return records


def wall_minutes(info, seconds_since_written):
    """Wall-clock of all sessions of a run, and whether that is only a lower bound. A session without a return code
    ended without its runner seeing the end (the runner was killed), so only the time recorded until then counts;
    unless it is the last session of a run whose run.json the runner's heartbeat still updates: one under way."""
    sessions = info.get("sessions") or []
    if not sessions:
        return None, False
    under_way = info.get("status") == "running" and seconds_since_written < 3 * HEARTBEAT_SECONDS
    seconds, lower_bound = 0.0, False
    for session in sessions[:-1] if under_way else sessions:
        seconds += session.get("seconds") or 0
        lower_bound |= session.get("returncode") is None
    if under_way:
        seconds += sessions[-1].get("seconds") or time.time() - sessions[-1]["started"]
    return seconds / 60, lower_bound


def load_runs(results_dir):
    runs = []
    runs_dir = os.path.join(results_dir, "runs")
    for key in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        match = re.fullmatch(r"(.+)__(.+)__(\d+)", key)
        metrics = os.path.join(runs_dir, key, "metrics.jsonl")
        if not match or not os.path.isfile(metrics):
            continue
        info, run_json = {}, os.path.join(runs_dir, key, "run.json")
        if os.path.isfile(run_json):
            with open(run_json) as file:
                info = json.load(file)
        records = load_records(metrics)
        minutes, minutes_lower_bound = (wall_minutes(info, time.time() - os.path.getmtime(run_json)) if info
                                        else (None, False))
        episodes = [(r["global_step"], r["charts/episodic_return"], r["charts/episodic_cost"]) for r in records
                    if "charts/episodic_return" in r and "charts/episodic_cost" in r]
        evals = [r for r in records if "eval/episodic_return" in r]
        limits = [r["charts/cost_limit"] for r in records if "charts/cost_limit" in r]
        violations = [r["charts/episodes_ended"] * r["charts/cost_violation"] for r in records
                      if "charts/cost_violation" in r]
        runs.append({"key": key, "algorithm": match[1], "task": match[2], "seed": int(match[3]),
                     "rounds": [r for r in records if "estep/kl_q_pi_old" in r],
                     "command": shlex.split(info.get("command", "")),
                     "cost_q": [(r["global_step"], r["charts/q_cost"]) for r in records if "charts/q_cost" in r],
                     "episode_lengths": [r["charts/episodic_length"] for r in records if "charts/episodic_length" in r],
                     "episodes": np.array(episodes, dtype=float).reshape(-1, 3),
                     "last_eval": evals[-1] if evals else None,
                     "steps": max((r["global_step"] for r in records), default=0),
                     "total_timesteps": info.get("total_timesteps"),
                     "done": os.path.isfile(os.path.join(runs_dir, key, "DONE")),
                     "wall_minutes": minutes, "wall_minutes_lower_bound": minutes_lower_bound,
                     "cost_limit": limits[-1] if limits else None,
                     # logged since the runs of the reproduction presets; older runs have no per-episode violation
                     "cumulative_violation": float(np.sum(violations)) if violations else None})
    return runs


def final_performance(run, fraction):
    episodes = run["episodes"]
    if len(episodes) == 0:
        return None, None
    cutoff = run["steps"] * (1 - fraction)
    last = episodes[episodes[:, 0] >= cutoff]
    if len(last) == 0:
        last = episodes[-1:]
    return float(last[:, 1].mean()), float(last[:, 2].mean())


def steps_to_target(run, target_return, cost_limit, bins):
    """Env steps after which the run's training episodes, averaged in `bins` equal bins of its steps, keep a return
    of at least target_return at a cost at or below cost_limit in every later bin; None if they never do."""
    grid = np.linspace(0, run["steps"], bins + 1)
    returns, costs = binned_curve(run["episodes"], grid, 1), binned_curve(run["episodes"], grid, 2)
    meets = (returns >= target_return) & (costs <= cost_limit)
    if not meets[-1]:
        return None
    failing = np.flatnonzero(~meets)
    first = failing[-1] + 1 if len(failing) else 0
    return float(grid[first + 1])  # the end of the first bin of the streak


@functools.cache
def script_defaults(algorithm):
    """The literal defaults of an algorithm script's Args (flag -> value), read from its source without importing
    it (a variant's, or a run named <algorithm>_<something> outside the suite's variants, are its algorithm's)."""
    base = VARIANTS.get(algorithm, (algorithm, []))[0]
    base = next((name for name in ALGORITHM_SCRIPTS if base == name or base.startswith(name + "_")), base)
    with open(script_path(base)) as source:
        tree = ast.parse(source.read())
    args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
    defaults = {}
    for field in args.body:
        if isinstance(field, ast.AnnAssign) and field.value is not None:
            try:
                defaults["--" + field.target.id.replace("_", "-")] = ast.literal_eval(field.value)
            except ValueError:  # not a literal, e.g. a default_factory
                pass
    return defaults


def flag_value(run, flag):
    """A run's value of a numeric flag: the last one its command gives (variants append theirs), else its script's
    default."""
    command = run["command"] + [""]
    given = [command[i + 1] if word == flag else word.split("=", 1)[1]
             for i, word in enumerate(command) if word == flag or word.startswith(flag + "=")]
    return float(given[-1]) if given else float(script_defaults(run["algorithm"])[flag])


def cvpo_bounds_table(runs):
    """Per CVPO run: the largest round maximum of each bounded quantity as a multiple of its bound, the E-step's
    largest KKT residual and infeasible fraction, and the cost critic against the Monte Carlo cost-to-go."""
    lines = ["## CVPO: bounds held, and the cost critic's bias", "",
             "Per run, over every logged round: the largest within-round maximum of KL(q || pi_old), KL_mu and "
             "KL_sigma as multiples of their bounds (eps_kl, eps_mu, eps_sigma), the largest KKT residual of the "
             "E-step (in units of its bounds), the fraction of updates whose cost bound could not be met inside the "
             "KL ball, and, over the second half of the run, the mean cost Q at the states and actions of each "
             "round's episodes against their Monte Carlo discounted cost-to-go (ratio > 1: the critic is "
             "pessimistic), and the cost Q over the whole replay buffer against the cost Q at those recent states "
             "(ratio < 1: the buffer's old states look cheaper than the ones the policy now visits).", "",
             "| run | rounds | KL(q‖pi_old) / eps_kl | KL_mu / eps_mu | KL_sigma / eps_sigma | KKT residual | "
             "infeasible updates | Q_c / MC cost-to-go (2nd half) | replay Q_c / recent Q_c (2nd half) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        rounds = run["rounds"]
        if not run["algorithm"].startswith("cvpo") or not rounds or "mstep/kl_mu_max" not in rounds[-1]:
            continue
        bound = {flag: flag_value(run, flag) for flag in ("--estep-kl", "--mstep-kl-mu", "--mstep-kl-sigma")}
        largest = lambda name: max(r[name] for r in rounds if name in r)
        second_half = [r for r in rounds if r["global_step"] >= run["steps"] / 2 and "bias/mc_cost_recent" in r]
        mc_cost = np.mean([r["bias/mc_cost_recent"] for r in second_half]) if second_half else 0.0
        recent_q = np.mean([r["bias/q_cost_recent"] for r in second_half]) if second_half else 0.0
        bias = recent_q / mc_cost if mc_cost > 0 else None
        replay = [r["bias/q_cost_replay"] for r in second_half if "bias/q_cost_replay" in r]
        shift = np.mean(replay) / recent_q if replay and recent_q > 0 else None
        lines.append(f"| {run['key']} | {len(rounds)} | {largest('estep/kl_q_pi_old_max') / bound['--estep-kl']:.3f} | "
                     f"{largest('mstep/kl_mu_max') / bound['--mstep-kl-mu']:.2f} | "
                     f"{largest('mstep/kl_sigma_max') / bound['--mstep-kl-sigma']:.2f} | "
                     f"{largest('estep/kkt_residual_max'):.1e} | "
                     f"{np.mean([r['estep/infeasible'] for r in rounds]):.0%} | "
                     f"{'n/a' if bias is None else f'{bias:.2f}'} | {'n/a' if shift is None else f'{shift:.2f}'} |")
    return lines + [""] if len(lines) > 6 else []


def sac_cost_critic_table(runs, max_cost_per_step=1.0):
    """Per SAC-Lag run: the round-mean cost Q (the actor's actions at replay states) against zero, against its
    largest possible value max_cost / (1 - gamma), and over the second half against the discounted cost of the
    training data (training cost per step / (1 - gamma))."""
    lines = ["## SAC-Lag: the cost critic against the cost the policy incurs", "",
             "Per run: the smallest and largest round mean of `charts/q_cost` (the max of the twin cost critics at "
             f"the actor's actions on replay states) over the whole run, against 0 and the largest possible value "
             f"{max_cost_per_step:g} / (1 - gamma) (Safety-Gymnasium costs are 0 or 1 per step); and over the second "
             "half, its mean against the discounted cost of the training episodes (cost per step / (1 - gamma)).", "",
             "| run | rounds | smallest Q_c | largest Q_c | upper bound | Q_c (2nd half) | data's discounted cost "
             "(2nd half) | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        if run["algorithm"] != "sac_lagrangian" or not run["cost_q"]:
            continue
        gamma = flag_value(run, "--gamma")
        cost_q = np.array(run["cost_q"])
        episodes = run["episodes"][run["episodes"][:, 0] >= run["steps"] / 2]
        second_half_q = cost_q[cost_q[:, 0] >= run["steps"] / 2, 1].mean()
        data_cost = episodes[:, 2].mean() / np.mean(run["episode_lengths"]) / (1 - gamma)
        lines.append(f"| {run['key']} | {len(cost_q)} | {cost_q[:, 1].min():.2f} | {cost_q[:, 1].max():.1f} | "
                     f"{max_cost_per_step / (1 - gamma):.0f} | {second_half_q:.2f} | {data_cost:.2f} | "
                     f"{second_half_q / data_cost:.2f} |")
    return lines + [""] if len(lines) > 6 else []


def mean_std(values, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def seed_mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def side_by_side(ours, theirs):
    if ours is None or theirs is None:
        return "n/a"
    return f"{ours:.1f} vs {theirs:.1f} ({ours - theirs:+.1f})"


def steps_label(steps, seeds):
    """Mean env steps over the seeds that reached the target, with how many did."""
    reached = [s for s in steps if s is not None]
    if not reached:
        return f"never (0/{seeds})"
    return f"{np.mean(reached) / 1000:,.0f}k ({len(reached)}/{seeds})"


def binned_curve(episodes, grid, column):
    """Mean of the episodes ending in each grid bin; empty bins are interpolated, beyond the run's end NaN."""
    values = np.full(len(grid) - 1, np.nan)
    if len(episodes) == 0:
        return values
    # an episode ending on a bin's right edge (the run's last step included) belongs to that bin
    index = np.clip(np.searchsorted(grid, episodes[:, 0], side="left") - 1, 0, len(values) - 1)
    for i in range(len(values)):
        inside = episodes[index == i, column]
        if len(inside):
            values[i] = inside.mean()
    known = np.flatnonzero(~np.isnan(values))
    if len(known) >= 2:
        span = np.arange(known[0], known[-1] + 1)
        values[span] = np.interp(span, known, values[known])
    return values


def plot_task(task, runs, path, grid_points, cost_limit):
    max_step = max(run["steps"] for run in runs)
    grid = np.linspace(0, max_step, grid_points + 1)
    centres = (grid[:-1] + grid[1:]) / 2
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm in sorted({run["algorithm"] for run in runs}):
        mine = [run for run in runs if run["algorithm"] == algorithm]
        for axis, column in zip(axes, (1, 2)):
            curves = np.array([binned_curve(run["episodes"], grid, column) for run in mine])
            with warnings.catch_warnings():  # all-NaN bins (beyond every seed's end) stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)
            line, = axis.plot(centres, mean, label=f"{NAMES.get(algorithm, algorithm)} ({len(mine)} seed{'s' if len(mine) > 1 else ''})")
            axis.fill_between(centres, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if cost_limit is not None:
        axes[1].axhline(cost_limit, color="black", linestyle="--", linewidth=1, label=f"cost limit {cost_limit:g}")
    for axis, label in zip(axes, ("episodic return", "episodic cost")):
        axis.set_xlabel("env steps")
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{task}: training episodes, mean ± std over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarise_task(runs, final_fraction, target, bins):
    """One task's runs per algorithm: final return and cost, last evaluation, violation and steps-to-target per seed.
    The target return defaults to half the best final return of any algorithm on the task."""
    limits = [run["cost_limit"] for run in runs if run["cost_limit"] is not None]
    cost_limit = limits[0] if limits else None
    cells = {}
    for algorithm in sorted({run["algorithm"] for run in runs}):
        group = [run for run in runs if run["algorithm"] == algorithm]
        finals = [final_performance(run, final_fraction) for run in group]
        evals = [run["last_eval"] or {} for run in group]
        cells[algorithm] = {"runs": group, "returns": [f[0] for f in finals], "costs": [f[1] for f in finals],
                            "eval_returns": [e.get("eval/episodic_return") for e in evals],
                            "eval_costs": [e.get("eval/episodic_cost") for e in evals],
                            "violations": [run["cumulative_violation"] for run in group]}
    best_final = max((np.mean([r for r in cell["returns"] if r is not None] or [-np.inf]) for cell in cells.values()),
                     default=-np.inf)
    if target is None and np.isfinite(best_final) and best_final > 0:
        target = best_final / 2
    for cell in cells.values():
        cell["reach"] = [steps_to_target(run, target, cost_limit, bins)
                         if target is not None and cost_limit is not None and len(run["episodes"]) else None
                         for run in cell["runs"]]
    return {"runs": runs, "cost_limit": cost_limit, "target": target, "cells": cells}


def steps_reached(cell):
    budget = cell["runs"][0]["total_timesteps"]
    return f"{min(run['steps'] for run in cell['runs']):,}" + (f" / {budget:,}" if budget else "")


def reproduction_table(summaries):
    """Every task and algorithm in one table, each published figure for the same task and kind of method beside it."""
    lines = ["## Summary, with the published figures", "",
             "Ours: mean ± std over seeds (the tables below show each seed). Published: the figure for the same task "
             "and kind of method, at its own budget (see the sources at the end).", "",
             "| task (cost limit) | algorithm | seeds (finished) | env steps | final return | final cost | eval return "
             "| eval cost | violation | steps to target | published return / cost (budget) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for task, summary in summaries.items():
        limit = summary["cost_limit"]
        for algorithm, cell in summary["cells"].items():
            base = VARIANTS.get(algorithm, (algorithm,))[0]
            family = "cvpo" if base in ("cvpo", "fsrl_cvpo") else base
            published = "; ".join(f"{ref['algorithm']}: {ref['return']} / {ref['cost']} ({ref['budget']})"
                                  for ref in REFERENCES if ref["env_id"] == task and ref["family"] == family)
            lines.append(
                f"| {task}" + (f" ({limit:g})" if limit is not None else "") + f" | {NAMES.get(algorithm, algorithm)} | "
                f"{len(cell['runs'])} ({sum(run['done'] for run in cell['runs'])}) | {steps_reached(cell)} | "
                f"{mean_std(cell['returns'])} | {mean_std(cell['costs'])} | {mean_std(cell['eval_returns'])} | "
                f"{mean_std(cell['eval_costs'])} | {mean_std(cell['violations'], 0)} | "
                f"{steps_label(cell['reach'], len(cell['runs'])) if summary['target'] is not None else 'n/a'} | "
                f"{published or '—'} |")
    return lines + [""]


def against_baselines_table(summaries):
    """Per task, CVPO against each other method run on it: differences of the seed means."""
    rows = []
    for task, summary in summaries.items():
        cells = summary["cells"]
        if "cvpo" not in cells:
            continue
        ours = cells["cvpo"]
        for other in (name for name in BASELINES if name in cells):
            theirs = cells[other]
            violations = seed_mean(ours["violations"]), seed_mean(theirs["violations"])
            reached = [sum(step is not None for step in cell["reach"]) for cell in (ours, theirs)]
            unfinished = not all(run["done"] for run in ours["runs"] + theirs["runs"])
            rows.append(f"| {task} | {NAMES.get(other, other)}{' (runs unfinished)' if unfinished else ''} | "
                        f"{side_by_side(seed_mean(ours['returns']), seed_mean(theirs['returns']))} | "
                        f"{side_by_side(seed_mean(ours['costs']), seed_mean(theirs['costs']))} | "
                        f"{side_by_side(seed_mean(ours['eval_returns']), seed_mean(theirs['eval_returns']))} | "
                        + ("n/a" if None in violations else f"{violations[0]:.0f} / {violations[1]:.0f}") + " | "
                        f"{reached[0]}/{len(ours['runs'])} against {reached[1]}/{len(theirs['runs'])} |")
    if not rows:
        return []
    return ["## CVPO against each other method", "",
            "Seed means, CVPO vs the other method (CVPO minus the other): a positive return difference and a negative "
            "cost difference favour CVPO. Violation: cumulative over training, CVPO / the other. Target: the seeds that "
            "reached the task's target return and kept it within the limit.",
            "", "| task | against | final return | final cost | eval return | violation | seeds reaching the target |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |", *rows, ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=os.path.join(BENCHMARKS_DIR, "results"))
    parser.add_argument("--final-fraction", type=float, default=0.1,
                        help="the final performance averages the training episodes in this last fraction of steps")
    parser.add_argument("--grid-points", type=int, default=50, help="bins on the env-step axis of the plots")
    parser.add_argument("--target-bins", type=int, default=20,
                        help="bins of each run's steps in which steps-to-target averages the training episodes")
    parser.add_argument("--return-target", action="append", default=[], metavar="TASK=RETURN",
                        help="the return that steps-to-target asks for on a task (default: half the best final "
                             "return of any algorithm on it)")
    parser.add_argument("--title", default="Learning-quality suite", help="heading of learning.md")
    parser.add_argument("--regenerate", default="python benchmarks/run_suite.py --preset main",
                        help="the suite command that produced these runs, quoted in learning.md")
    args = parser.parse_args(argv)
    runs = load_runs(args.results_dir)
    aggregate_command = shlex.join(["python", "benchmarks/aggregate.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# {args.title}", "",
             f"Regenerate: `{args.regenerate}` (resumable), then `{aggregate_command}`.", "",
             f"Final return and cost: mean over the training episodes in the last {args.final_fraction:.0%} of each "
             "run's env steps, then mean ± std over seeds. Eval: the last evaluation of the deterministic policy "
             "(mean ± std over seeds). Steps: env steps reached (min over seeds) of the budget. Minutes: wall-clock "
             "per run (mean over seeds; runs shared a 2-core machine with other jobs; ≥: the runner of a session was "
             "killed, so the time it recorded is a lower bound). Violation: the cumulative "
             "constraint violation over training, the sum over training episodes of max(0, cost - limit) (n/a for "
             "runs that did not log it per episode). Steps to target: the env steps after which the training "
             f"episodes, averaged in {args.target_bins} equal bins of the run, keep at least the target return at a "
             "cost at or below the limit in every later bin (mean over the seeds that got there, and how many "
             "did).", ""]
    targets = {task: float(value) for task, _, value in (item.partition("=") for item in args.return_target)}
    tasks = sorted({run["task"] for run in runs})
    summaries = {task: summarise_task([run for run in runs if run["task"] == task], args.final_fraction,
                                      targets.get(task), args.target_bins) for task in tasks}
    if not runs:
        lines.append("No runs found.")
    else:
        lines += reproduction_table(summaries) + against_baselines_table(summaries)
    for task in tasks:
        summary = summaries[task]
        cost_limit, target = summary["cost_limit"], summary["target"]
        lines += [f"## {task}" + (f" (cost limit {cost_limit:g})" if cost_limit is not None else ""), "",
                  "| algorithm | seeds (finished) | final return | final cost | eval return | eval cost | "
                  f"violation | steps to return {'n/a' if target is None else f'{target:.1f}'} | env steps | "
                  "minutes per run |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        per_seed = []
        for algorithm, cell in summary["cells"].items():
            group = cell["runs"]
            minutes = [run["wall_minutes"] for run in group if run["wall_minutes"]]
            lower_bound = "≥ " if any(run["wall_minutes_lower_bound"] for run in group) else ""
            minutes = f"{lower_bound}{np.mean(minutes):.0f}" if minutes else "n/a"
            lines.append(
                f"| {NAMES.get(algorithm, algorithm)} | {len(group)} ({sum(run['done'] for run in group)}) | "
                f"{mean_std(cell['returns'])} | {mean_std(cell['costs'])} | {mean_std(cell['eval_returns'])} | "
                f"{mean_std(cell['eval_costs'])} | {mean_std(cell['violations'], 0)} | "
                f"{steps_label(cell['reach'], len(group)) if target is not None else 'n/a'} | "
                f"{steps_reached(cell)} | {minutes} |")
            for index, run in enumerate(group):
                evaluation, reached = run["last_eval"] or {}, cell["reach"][index]
                cell_text = lambda value, digits=1: "n/a" if value is None else f"{value:.{digits}f}"
                per_seed.append(
                    f"| {NAMES.get(algorithm, algorithm)} | {run['seed']} | {cell_text(cell['returns'][index])} | "
                    f"{cell_text(cell['costs'][index])} | {cell_text(evaluation.get('eval/episodic_return'))} | "
                    f"{cell_text(evaluation.get('eval/episodic_cost'))} | {cell_text(run['cumulative_violation'], 0)} | "
                    f"{'never' if reached is None else f'{reached / 1000:,.0f}k'} | {run['steps']:,} |")
        lines += ["", "Each seed:", "", "| algorithm | seed | final return | final cost | eval return | eval cost | "
                  "violation | steps to target | env steps |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  *per_seed]
        plot_name = f"learning_{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.png"
        plot_task(task, summary["runs"], os.path.join(args.results_dir, plot_name), args.grid_points, cost_limit)
        lines += ["", f"![{task}]({plot_name})", ""]
    lines += cvpo_bounds_table(runs)
    lines += sac_cost_critic_table(runs)
    lines += ["## Published reference figures", "",
              "Not comparable one to one: different budgets (env steps; ours are in the tables above), "
              "implementations and evaluation protocols. Returns and costs are episodic.", "",
              "| algorithm | task | cost limit | budget (env steps) | return | cost | source |",
              "| --- | --- | ---: | --- | ---: | ---: | --- |"]
    for ref in REFERENCES:
        lines.append(f"| {ref['algorithm']} | {ref['task']} | {ref['cost_limit']} | {ref['budget']} | {ref['return']} | "
                     f"{ref['cost']} | {ref['source']} |")
    lines += ["", f"_Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(runs)} runs._", ""]
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, "learning.md")
    with open(path, "w") as file:
        file.write("\n".join(lines))
    print(f"wrote {path} ({len(runs)} runs, {len(tasks)} tasks)")
    return path


if __name__ == "__main__":
    main()
