r"""Sweeps: one training per trial of a ``get_hyper(h)`` sweep, run here, printed, or on XManager.

    python -m artfr_jax.launch --config=configs/art.py:demo --sweep=experiments/X.py --root=ROOT \
        [--name=ID] [--mode=local|print|xm] [--parallel=N] [--only=0,3] [--set=config.a.b=v]
    python -m artfr_jax.launch collect ROOT/ID

The trials come from ``get_hyper(h)`` of ``--sweep`` (a file in ``experiments/``), else of the
config file, else one trial without overrides (:mod:`artfr_jax.hyper`). Trial ``i`` runs
``python -m artfr_jax.main --config=... --workdir=ROOT/ID/i --config.a.b=v ...`` with the flags
rendered as XManager renders job args (``--k=v``; booleans ``--k`` / ``--nok``); ``--set`` adds
fixed overrides to every trial (e.g. a shared stage-I workdir). ``ID`` defaults to the sweep
file's name, else the config's (``art_demo``).

``ROOT/ID/sweep.json`` records the trials, their commands and the git revision of each launch;
each trial's workdir gets ``command.sh``, ``launch.log`` (its output) and ``trial.json`` (status,
exit code, times). Launching again skips finished trials and resumes the others (the main command
resumes from its last checkpoint); a trial that another launcher is running is left to it.
Ctrl-C (or SIGTERM) stops the running trials with SIGTERM, so they checkpoint first.
``--mode=print`` only prints the commands; ``--mode=xm`` adds the same trials to an XManager
experiment on the local executor (``pip install xmanager``; not a dependency of this package).

``collect`` writes ``ROOT/ID/results.csv`` and ``results.md``: per trial its overrides, status,
last training step, and the final and best value of every ``eval/`` metric in its
``metrics.jsonl`` (best = highest, or lowest for losses, distances, LPIPS, FID, NIQE, LMD, Deg).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from artfr_jax import hyper

MODES = ("local", "print", "xm")
LOWER_IS_BETTER = ("loss", "l1", "l2", "mse", "lpips", "dists", "fid", "niqe", "lmd", "deg")


# ---------------------------------------------------------------------------- sweep and trials


def _load_module(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what}={path!r}: no such file")
    name = "artfr_launch_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_config(config: str) -> tuple[str, str | None]:
    """``'configs/art.py:demo'`` -> ``('configs/art.py', 'demo')``."""
    path, sep, arg = config.partition(":")
    return path, (arg if sep else None)


def load_config(config: str):
    """The ConfigDict that ``--config=config`` gives the main command."""
    path, arg = split_config(config)
    return _load_module(path, "--config").get_config(arg)


def load_trials(config: str, sweep_file: str | None = None) -> list[dict[str, Any]]:
    """The trials of ``get_hyper(h)`` from ``sweep_file``, else from the config file, else one."""
    if sweep_file:
        module = _load_module(sweep_file, "--sweep")
        if not hasattr(module, "get_hyper"):
            raise ValueError(f"--sweep={sweep_file}: defines no get_hyper(h)")
    else:
        module = _load_module(split_config(config)[0], "--config")
    get_hyper = getattr(module, "get_hyper", None)
    trials = get_hyper(hyper) if get_hyper else hyper.identity()
    if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials) or not trials:
        raise ValueError(f"get_hyper of {sweep_file or config}: expected a non-empty list of dicts")
    return trials


def check_trials(config, trials: Sequence[dict[str, Any]]) -> None:
    """Each override names an existing field and has its type (one-line ValueError otherwise)."""
    for i, trial in enumerate(trials):
        try:
            hyper.apply(config.copy_and_resolve_references(), trial)
        except ValueError as e:
            raise ValueError(f"trial {i}: {e}") from None


def check_fixed(config, fixed: Sequence[str]) -> None:
    """Each ``--set=config.a.b=v`` names an existing field (its value is parsed by main)."""
    for f in fixed:
        key, sep, _ = f.partition("=")
        node = config
        try:
            if not sep or not key.startswith("config."):
                raise KeyError(key)
            for p in key.split(".")[1:]:
                node = node[p]
        except (KeyError, TypeError):
            raise ValueError(
                f"--set={f!r}: expected config.a.b=value naming a config field"
            ) from None


def render_flag(key: str, value: Any) -> str:
    """One override as a command-line flag, the way XManager renders job args."""
    if isinstance(value, bool):
        return f"--{key}" if value else f"--no{key}"
    if isinstance(value, list | tuple):
        return f"--{key}={tuple(value)!r}"
    if value is None:
        raise ValueError(f"{key}=None: a sweep value must be a bool, number, string or tuple")
    return f"--{key}={value}"


def default_name(config: str, sweep_file: str | None) -> str:
    if sweep_file:
        return os.path.splitext(os.path.basename(sweep_file))[0]
    path, arg = split_config(config)
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}_{arg.replace(',', '_')}" if arg else stem


@dataclasses.dataclass
class Trial:
    index: int
    overrides: dict[str, Any]
    workdir: str
    argv: list[str]

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def make_trials(
    config: str,
    sweep_dir: str,
    trials: Sequence[dict[str, Any]],
    fixed: Sequence[str] = (),
    python: str = sys.executable,
) -> list[Trial]:
    """The command of each trial: the main command with its workdir and overrides."""
    path, arg = split_config(config)
    config_arg = os.path.abspath(path) + (f":{arg}" if arg is not None else "")
    out = []
    for i, overrides in enumerate(trials):
        workdir = os.path.join(sweep_dir, str(i))
        argv = [python, "-m", "artfr_jax.main", f"--config={config_arg}", f"--workdir={workdir}"]
        argv += [render_flag(k, v) for k, v in overrides.items()]
        argv += [f"--{f}" for f in fixed]
        out.append(Trial(i, dict(overrides), workdir, argv))
    return out


def parse_only(only: str, n: int) -> list[int]:
    """``'0,3'`` or ``'2-4'`` -> trial indices (checked against the sweep's length)."""
    if not only:
        return list(range(n))
    picked: list[int] = []
    for part in only.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"--only={only!r}: expected indices like 0,3 or 2-4") from None
        if not 0 <= first <= last < n:
            raise ValueError(f"--only={only!r}: the sweep has trials 0-{n - 1}")
        picked += [i for i in range(first, last + 1) if i not in picked]
    return picked


# ----------------------------------------------------------------------------- records on disk


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def git_revision() -> dict[str, Any]:
    """The revision of the checkout this package runs from, and whether it has local changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=repr)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def _jsonable(trial: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(trial, default=repr))


def write_sweep_record(
    sweep_dir: str, config: str, sweep_file: str | None, fixed: Sequence[str], trials: list[Trial]
) -> dict:
    """Creates or updates ``sweep.json``; a different sweep under the same name is an error."""
    path = os.path.join(sweep_dir, "sweep.json")
    record = _read_json(path)
    overrides = [_jsonable(t.overrides) for t in trials]
    if record is not None:
        old = [t["overrides"] for t in record.get("trials", [])]
        if record.get("config") != config or old != overrides or record.get("fixed") != list(fixed):
            raise ValueError(
                f"{path}: holds another sweep (config {record.get('config')!r}, {len(old)} trials);"
                " choose another --name or --root"
            )
    else:
        record = {
            "name": os.path.basename(sweep_dir),
            "config": config,
            "sweep": sweep_file,
            "fixed": list(fixed),
            "created": _now(),
            "trials": [
                {"index": t.index, "overrides": o, "workdir": t.workdir, "command": t.command}
                for t, o in zip(trials, overrides, strict=True)
            ],
            "launches": [],
        }
    record["launches"].append({"time": _now(), "git": git_revision(), "argv": sys.argv[1:]})
    os.makedirs(sweep_dir, exist_ok=True)
    _write_json(path, record)
    return record


def trial_status(workdir: str) -> dict:
    return _read_json(os.path.join(workdir, "trial.json")) or {"status": "not started"}


# ------------------------------------------------------------------------------- local runner


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _describe(trial: Trial) -> str:
    return " ".join(render_flag(k, v) for k, v in trial.overrides.items()) or "(no overrides)"


def _tail(path: str, lines: int = 6) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class _Running:
    def __init__(self, trial: Trial, attempt: int):
        self.trial = trial
        self.started = time.time()
        self.lock = None
        os.makedirs(trial.workdir, exist_ok=True)
        with open(os.path.join(trial.workdir, "command.sh"), "w", encoding="utf-8") as f:
            f.write("#!/usr/bin/env bash\n" + trial.command + "\n")
        self.log_path = os.path.join(trial.workdir, "launch.log")
        self.log = open(self.log_path, "a", encoding="utf-8")
        self.log.write(f"\n=== launch attempt {attempt} at {_now()}: {trial.command}\n")
        self.log.flush()
        self.record = {
            "index": trial.index,
            "overrides": _jsonable(trial.overrides),
            "command": trial.command,
            "status": "running",
            "attempt": attempt,
            "started": _now(),
            "pid": None,
        }
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            trial.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.record["pid"] = self.proc.pid
        _write_json(os.path.join(trial.workdir, "trial.json"), self.record)

    def finish(self, returncode: int, interrupted: bool) -> dict:
        self.log.close()
        seconds = time.time() - self.started
        status = "finished" if returncode == 0 else ("interrupted" if interrupted else "failed")
        self.record.update(
            status=status, returncode=returncode, ended=_now(), seconds=round(seconds, 1)
        )
        _write_json(os.path.join(self.trial.workdir, "trial.json"), self.record)
        if self.lock is not None:
            self.lock.release()
        return self.record


def _try_lock(workdir: str):
    """A lock on the trial's workdir, or None when another launcher holds it."""
    import filelock  # noqa: PLC0415

    os.makedirs(workdir, exist_ok=True)
    lock = filelock.FileLock(os.path.join(workdir, "trial.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None
    return lock


def run_local(trials: Sequence[Trial], parallel: int = 1, say=print) -> dict[int, str]:
    """Runs the trials as subprocesses, ``parallel`` at a time; returns each trial's status."""
    status: dict[int, str] = {}
    waiting: list[Trial] = []
    for t in trials:
        previous = trial_status(t.workdir)
        if previous.get("status") == "finished":
            status[t.index] = "finished"
            say(f"trial {t.index}: finished earlier, skipped")
        else:
            waiting.append(t)
    total, running = len(waiting), []
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        for r in running:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    done = 0
    try:
        while waiting or running:
            while waiting and len(running) < parallel and stop["signal"] is None:
                t = waiting.pop(0)
                lock = _try_lock(t.workdir)
                if lock is None:
                    status[t.index] = "running elsewhere"
                    say(f"trial {t.index}: another launcher is running it, left to it")
                    total -= 1
                    continue
                attempt = int(trial_status(t.workdir).get("attempt", 0)) + 1
                r = _Running(t, attempt)
                r.lock = lock
                running.append(r)
                resumed = " (resuming)" if attempt > 1 else ""
                say(f"trial {t.index} started{resumed}: {_describe(t)}; log {r.log_path}")
            if stop["signal"] is not None and not running:
                break
            time.sleep(0.5)
            for r in list(running):
                rc = r.proc.poll()
                if rc is None:
                    continue
                running.remove(r)
                record = r.finish(rc, stop["signal"] is not None)
                status[r.trial.index] = record["status"]
                done += 1
                say(
                    f"trial {r.trial.index} {record['status']} in {_fmt_seconds(record['seconds'])}"
                    f" (exit {rc}); {done}/{total} done, {len(running)} running,"
                    f" {len(waiting)} waiting"
                )
                if record["status"] == "failed":
                    say("  last lines of its log:\n" + _tail(r.log_path).rstrip())
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    for t in waiting:
        status.setdefault(t.index, "not started")
    return status


# ---------------------------------------------------------------------------------- XManager


def run_xm(name: str, trials: Sequence[Trial]) -> None:
    """The trials as jobs of one XManager experiment on the local executor."""
    try:
        from xmanager import xm, xm_local  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("--mode=xm needs XManager: pip install xmanager") from None
    with xm_local.create_experiment(experiment_title=name) as experiment:
        [executable] = experiment.package(
            [xm.binary(executor_spec=xm_local.Local.Spec(), path=trials[0].argv[0])]
        )
        for t in trials:
            experiment.add(
                xm.Job(executable=executable, executor=xm_local.Local(), args=t.argv[1:])
            )


# ----------------------------------------------------------------------------------- launch


def launch(
    config: str,
    root: str,
    *,
    trials: Sequence[dict[str, Any]] | None = None,
    sweep: str | None = None,
    name: str | None = None,
    mode: str = "local",
    parallel: int = 1,
    only: str = "",
    fixed: Sequence[str] = (),
    say=print,
) -> str:
    """Runs (``local``), prints (``print``) or submits (``xm``) a sweep; returns its folder.

    ``trials`` (a list of override dicts, e.g. from :mod:`artfr_jax.hyper`) replaces the
    ``get_hyper`` of ``sweep`` / the config file. Raises ValueError on a bad sweep and
    RuntimeError when a local trial failed.
    """
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
    if parallel < 1:
        raise ValueError(f"--parallel={parallel}: expected >= 1")
    if "://" in root and mode == "local":
        raise ValueError(f"--root={root}: local trials need a local folder")
    if trials is None:
        trials = load_trials(config, sweep)
    trials = [{hyper.field_key(k): v for k, v in t.items()} for t in trials]
    loaded = load_config(config)
    check_trials(loaded, trials)
    check_fixed(loaded, fixed)
    name = name or default_name(config, sweep)
    sweep_dir = os.path.join(os.path.abspath(root) if "://" not in root else root, name)
    all_trials = make_trials(config, sweep_dir, trials, fixed)
    picked = [all_trials[i] for i in parse_only(only, len(all_trials))]

    if mode == "print":
        for t in picked:
            say(t.command)
        return sweep_dir
    write_sweep_record(sweep_dir, config, sweep, fixed, all_trials)
    if mode == "xm":
        run_xm(name, picked)
        say(f"{len(picked)} trials added to XManager experiment {name!r}")
        return sweep_dir
    say(f"sweep {name}: {len(picked)} of {len(all_trials)} trials in {sweep_dir}")
    status = run_local(picked, parallel, say)
    failed = sorted(i for i, s in status.items() if s != "finished")
    summary = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    say(f"sweep {name}: {summary}; results: python -m artfr_jax.launch collect {sweep_dir}")
    if failed:
        raise RuntimeError(f"sweep {name}: trials {failed} did not finish (see their launch.log)")
    return sweep_dir


# ---------------------------------------------------------------------------------- collect


def _lower_is_better(metric: str) -> bool:
    leaf = metric.split("/")[-1].lower()
    return any(
        leaf == w or leaf.startswith(w + "_") or leaf.endswith("_" + w) for w in LOWER_IS_BETTER
    )


def _metrics_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill
    except OSError:
        pass
    return rows


def summarize_trial(workdir: str) -> dict[str, Any]:
    """Status, last step, and final / best value of each ``eval/`` metric of one trial."""
    rows = _metrics_rows(workdir)
    out: dict[str, Any] = {"status": trial_status(workdir).get("status", "not started")}
    out["last_step"] = max((int(r["step"]) for r in rows if "step" in r), default=None)
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, int | float):
                evals.setdefault(k, []).append((int(r.get("step", 0)), float(v)))
    for k, values in sorted(evals.items()):
        step, final = values[-1]
        pick = min if _lower_is_better(k) else max
        best_step, best = pick(values, key=lambda sv: sv[1])
        out[k] = final
        out[f"best {k}"] = best
        out[f"best {k} step"] = best_step
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def collect(sweep_dir: str, say=print) -> list[dict[str, Any]]:
    """Writes ``results.csv`` and ``results.md`` in ``sweep_dir``; returns the rows."""
    record = _read_json(os.path.join(sweep_dir, "sweep.json"))
    if record is None:
        raise ValueError(f"{sweep_dir}: no sweep.json (not a sweep folder of artfr_jax.launch)")
    rows = []
    keys = []
    for t in record["trials"]:
        for k in t["overrides"]:
            if k not in keys:
                keys.append(k)
    for t in record["trials"]:
        row = {"trial": t["index"]}
        row.update({k: t["overrides"].get(k) for k in keys})
        row.update(summarize_trial(t["workdir"]))
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with open(os.path.join(sweep_dir, "results.csv"), "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    shown = [c for c in columns if not c.endswith(" step") or c == "last_step"]
    names = [c.removeprefix("config.") for c in shown]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in shown) + " |" for r in rows]
    text = (
        f"Sweep `{record['name']}`: `{record['config']}`"
        + (f", sweep `{record['sweep']}`" if record.get("sweep") else "")
        + (f", fixed {', '.join(f'`{f}`' for f in record['fixed'])}" if record["fixed"] else "")
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
    with open(os.path.join(sweep_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    say(text.rstrip())
    say(f"wrote {os.path.join(sweep_dir, 'results.csv')} and results.md")
    return rows


# ------------------------------------------------------------------------------------- main


def _define_flags() -> None:
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("config", None, "Config file and variant, configs/NAME.py[:VARIANT].")
    flags.DEFINE_string("sweep", None, "A file defining get_hyper(h) (e.g. experiments/X.py).")
    flags.DEFINE_string("root", None, "Folder of sweeps; trials go to ROOT/<name>/<i>.")
    flags.DEFINE_string("name", None, "Sweep id (default: the sweep file's or config's name).")
    flags.DEFINE_enum("mode", "local", MODES, "Run here, print the commands, or use XManager.")
    flags.DEFINE_integer("parallel", 1, "Local trials run at the same time.")
    flags.DEFINE_string("only", "", "Trial indices to run, e.g. 0,3 or 2-4 (default: all).")
    flags.DEFINE_multi_string("set", [], "A fixed override for every trial: config.a.b=value.")


def main(argv: Sequence[str]) -> int:
    from absl import app, flags  # noqa: PLC0415

    F = flags.FLAGS
    try:
        if len(argv) > 1:
            if argv[1] != "collect" or len(argv) != 3:
                raise app.UsageError(f"unexpected arguments {argv[1:]}; expected: collect ROOT/ID")
            collect(argv[2])
            return 0
        missing = [f"--{n}" for n in ("config", "root") if not F[n].value]
        if missing:
            raise app.UsageError(f"{', '.join(missing)} required")
        launch(
            F.config,
            F.root,
            sweep=F.sweep,
            name=F.name,
            mode=F.mode,
            parallel=F.parallel,
            only=F.only,
            fixed=F.set,
        )
    except (ValueError, RuntimeError) as e:
        print(f"launch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
