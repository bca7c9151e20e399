"""Sweeps (artfr_jax/hyper.py) and the launcher (artfr_jax/launch.py): trials, rendering, a
half-finished sweep resumed, ``collect`` on finished tiny trials, the XManager path."""

import csv
import json
import os
import subprocess
import sys
import types

import pytest

from artfr_jax import hyper, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQGAN_TINY = os.path.join(REPO, "configs", "vqgan.py") + ":tiny"


def test_sweep_product_zip_chain_fixed():
    seeds = hyper.sweep("config.seed", [0, 1])
    assert seeds == [{"config.seed": 0}, {"config.seed": 1}]
    assert hyper.sweep("model.width", [8]) == [{"config.model.width": 8}]  # prefix added
    grid = hyper.product([seeds, hyper.sweep("config.model.long_skips", [True, False])])
    assert grid == [
        {"config.seed": 0, "config.model.long_skips": True},
        {"config.seed": 0, "config.model.long_skips": False},
        {"config.seed": 1, "config.model.long_skips": True},
        {"config.seed": 1, "config.model.long_skips": False},
    ]
    zipped = hyper.zipit([seeds, hyper.sweep("config.loss.feature_weight", [1.0, 0.0])])
    assert zipped == [
        {"config.seed": 0, "config.loss.feature_weight": 1.0},
        {"config.seed": 1, "config.loss.feature_weight": 0.0},
    ]
    assert hyper.chainit([seeds, hyper.fixed("config.seed", 7)]) == seeds + [{"config.seed": 7}]
    assert hyper.fixed("config.batch_size", 4, length=2) == [{"config.batch_size": 4}] * 2
    with pytest.raises(ValueError, match="different lengths"):
        hyper.zipit([seeds, hyper.fixed("config.seed", 3)])
    with pytest.raises(ValueError, match="set twice"):
        hyper.product([seeds, hyper.fixed("config.seed", 5)])
    with pytest.raises(ValueError, match="no values"):
        hyper.sweep("config.seed", [])


def test_apply_sets_fields_by_their_command_line_names():
    config = launch.load_config(VQGAN_TINY)
    config.lock()
    seed, codes = config.seed, config.model.num_embeddings
    got = hyper.apply(config, {"config.seed": seed + 3, "model.num_embeddings": codes * 2})
    assert got is config and config.seed == seed + 3 and config.model.num_embeddings == codes * 2
    hyper.apply(config, {"model.block_out_channels": [8, 16]})
    assert config.model.block_out_channels == (8, 16)  # a list (JSON, flags) stored as a tuple
    with pytest.raises(ValueError, match=r"^config.model.num_embedings=8: no such field$"):
        hyper.apply(config, {"config.model.num_embedings": 8})
    with pytest.raises(ValueError, match=r"^config.seed='a': "):
        hyper.apply(config, {"config.seed": "a"})
    assert config.seed == seed + 3  # a refused value leaves the field as it was


def test_assignments_parse_by_the_fields_type():
    """``KEY=VALUE`` text (benchmarks' ``--set``) read as the field's type, then ``apply``."""
    config = launch.load_config(VQGAN_TINY)
    hyper.apply_assignment(config, "seed=5")
    hyper.apply_assignment(config, "config.model.block_out_channels=16,32")
    hyper.apply_assignment(config, "model.remat=matmuls")
    hyper.apply_assignment(config, "model.normalize_codes=true")
    assert (config.seed, config.model.block_out_channels) == (5, (16, 32))
    assert (config.model.remat, config.model.normalize_codes) == ("matmuls", True)
    with pytest.raises(ValueError, match=r"^--set 'seed': expected KEY=VALUE"):
        hyper.apply_assignment(config, "seed")
    with pytest.raises(ValueError, match=r"^config.model.widht: no such field$"):
        hyper.apply_assignment(config, "model.widht=3")
    with pytest.raises(ValueError, match=r"^config.seed='x': expected int$"):
        hyper.apply_assignment(config, "seed=x")


def test_flags_render_as_xmanager_does_and_the_config_parses_them(tmp_path):
    assert launch.render_flag("config.model.long_skips", True) == "--config.model.long_skips"
    assert launch.render_flag("config.model.long_skips", False) == "--noconfig.model.long_skips"
    assert launch.render_flag("config.seed", 3) == "--config.seed=3"
    assert launch.render_flag("config.x", [0.5, 2.0]) == "--config.x=(0.5, 2.0)"
    assert launch.render_flag("config.model.condition_mode", "concat") == (
        "--config.model.condition_mode=concat"
    )
    trials = [
        {
            "config.model.long_skips": False,
            "config.loss.feature_weight": 0.0,
            "config.model.condition_mode": "cross_attention",
            "config.data.degradation.blur_sigma": (0.2, 2.0),
        }
    ]
    config = os.path.join(REPO, "configs", "art.py") + ":demo"
    [trial] = launch.make_trials(config, str(tmp_path / "s"), trials)
    assert trial.argv[:3] == [sys.executable, "-m", "artfr_jax.main"]
    assert f"--workdir={tmp_path / 's' / '0'}" in trial.argv
    # The main command's own flag parser reads the rendered flags back into the same values.
    probe = (
        "import sys; from absl import flags; from ml_collections import config_flags;"
        "c = config_flags.DEFINE_config_file('config');"
        "flags.DEFINE_string('workdir', None, '');"
        "flags.FLAGS(sys.argv);"
        "v = c.value; print(v.model.long_skips, v.loss.feature_weight, v.model.condition_mode,"
        " v.data.degradation.blur_sigma)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *trial.argv[3:]],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert out.stdout.split("\n")[-2] == "False 0.0 cross_attention (0.2, 2.0)"


def test_bad_sweeps_are_one_line_errors(tmp_path):
    config = launch.load_config(VQGAN_TINY)
    with pytest.raises(ValueError, match=r"trial 1: config.model.widht=8: no such field"):
        launch.check_trials(config, [{"config.seed": 1}, {"config.model.widht": 8}])
    with pytest.raises(ValueError, match=r"trial 0: config.seed='a'"):
        launch.check_trials(config, [{"config.seed": "a"}])
    with pytest.raises(ValueError, match="naming a config field"):
        launch.launch(VQGAN_TINY, str(tmp_path), mode="print", fixed=["config.nope=1"])
    with pytest.raises(ValueError, match=r"--only='5': the sweep has trials 0-1"):
        launch.parse_only("5", 2)
    assert launch.parse_only("0,2-3", 5) == [0, 2, 3]
    sweep_file = tmp_path / "empty.py"
    sweep_file.write_text("X = 1\n")
    with pytest.raises(ValueError, match="defines no get_hyper"):
        launch.load_trials(VQGAN_TINY, str(sweep_file))
    assert launch.default_name("configs/art.py:demo", None) == "art_demo"
    assert launch.default_name("configs/art.py:demo", "experiments/abl.py") == "abl"


def test_print_mode_and_the_command_line(tmp_path):
    sweep_file = tmp_path / "seeds.py"
    sweep_file.write_text("def get_hyper(h):\n    return h.sweep('config.seed', [3, 4])\n")
    out = subprocess.run(
        [sys.executable, "-m", "artfr_jax.launch", f"--config={VQGAN_TINY}",
         f"--sweep={sweep_file}", f"--root={tmp_path}", "--mode=print", "--only=1"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"--workdir={tmp_path}/seeds/1 --config.seed=4")
    assert not (tmp_path / "seeds").exists()  # print only prints
    bad = subprocess.run(
        [sys.executable, "-m", "artfr_jax.launch", f"--config={VQGAN_TINY}", f"--root={tmp_path}",
         "--set=config.batch_sise=2"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("launch: --set='config.batch_sise=2'")


def test_xm_mode_adds_one_job_per_trial(tmp_path, monkeypatch):
    """Against a stand-in for XManager's API (xmanager is not a dependency)."""
    calls = {"jobs": []}

    class Experiment:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def package(self, packageables):
            calls["packaged"] = packageables
            return ["EXE"]

        def add(self, job):
            calls["jobs"].append(job)

    xm = types.SimpleNamespace(
        binary=lambda executor_spec, path: ("binary", path),
        Job=lambda executable, executor, args: {"exe": executable, "args": args},
    )
    xm_local = types.SimpleNamespace(
        create_experiment=lambda experiment_title: (
            calls.update(title=experiment_title) or Experiment()
        ),
        Local=type("Local", (), {"Spec": staticmethod(lambda: "spec")}),
    )
    package = types.ModuleType("xmanager")
    package.xm, package.xm_local = xm, xm_local
    monkeypatch.setitem(sys.modules, "xmanager", package)
    trials = hyper.sweep("config.seed", [0, 1])
    sweep_dir = launch.launch(
        VQGAN_TINY, str(tmp_path), trials=trials, name="xmtest", mode="xm", say=lambda *_: None
    )
    assert calls["title"] == "xmtest" and calls["packaged"] == [("binary", sys.executable)]
    assert [j["args"][-1] for j in calls["jobs"]] == ["--config.seed=0", "--config.seed=1"]
    assert calls["jobs"][0]["args"][:2] == ["-m", "artfr_jax.main"]
    record = json.loads((tmp_path / "xmtest" / "sweep.json").read_text())
    assert [t["overrides"] for t in record["trials"]] == trials
    assert sweep_dir == str(tmp_path / "xmtest")


@pytest.mark.slow
def test_half_finished_sweep_resumes_and_collect_tables_it(tmp_path):
    """Trial 0 runs alone; trial 1 is left 'running' by a launcher that died; launching again
    skips 0, runs 1 (attempt 2), and collect writes both trials' eval metrics."""
    trials = hyper.sweep("config.seed", [0, 1])
    fixed = ["config.num_train_steps=2", "config.eval_every=2", "config.checkpoint_every=2"]
    lines: list[str] = []
    kwargs = dict(trials=trials, name="seeds", fixed=fixed, say=lines.append)
    sweep_dir = launch.launch(VQGAN_TINY, str(tmp_path), only="0", **kwargs)
    assert launch.trial_status(os.path.join(sweep_dir, "0"))["status"] == "finished"
    assert not os.path.exists(os.path.join(sweep_dir, "1", "trial.json"))
    os.makedirs(os.path.join(sweep_dir, "1"))
    with open(os.path.join(sweep_dir, "1", "trial.json"), "w") as f:
        json.dump({"status": "running", "attempt": 1, "pid": 1}, f)  # its launcher was killed

    lines.clear()
    launch.launch(VQGAN_TINY, str(tmp_path), **kwargs)
    assert "trial 0: finished earlier, skipped" in lines
    assert any(line.startswith("trial 1 started (resuming)") for line in lines)
    one = launch.trial_status(os.path.join(sweep_dir, "1"))
    assert one["status"] == "finished" and one["attempt"] == 2 and one["returncode"] == 0
    assert "--config.seed=1" in open(os.path.join(sweep_dir, "1", "command.sh")).read()
    record = json.loads(open(os.path.join(sweep_dir, "sweep.json")).read())
    assert len(record["launches"]) == 2 and record["fixed"] == fixed
    assert record["launches"][0]["git"]["revision"]  # the tests run from the git checkout

    # The same name with another sweep is refused instead of mixing trials.
    with pytest.raises(ValueError, match="holds another sweep"):
        launch.launch(VQGAN_TINY, str(tmp_path), trials=trials[:1], name="seeds", say=print)

    rows = launch.collect(sweep_dir, say=lines.append)
    assert [r["trial"] for r in rows] == [0, 1]
    assert [r["config.seed"] for r in rows] == [0, 1]
    for r in rows:
        assert r["status"] == "finished" and r["last_step"] == 2
        assert 0 < r["eval/l1"] < 1 and r["best eval/l1"] <= r["eval/l1"]
        assert r["eval/psnr"] > 0 and r["best eval/psnr"] >= r["eval/psnr"]
    assert rows[0]["eval/l1"] != rows[1]["eval/l1"]  # the seeds differ
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["config.seed"] for t in table] == ["0", "1"]
    md = open(os.path.join(sweep_dir, "results.md")).read()
    assert "| trial | seed | status | last_step |" in md and md.count("| finished |") == 2


def test_the_ablation_sweep_names_real_fields():
    """experiments/artfr_ablations.py: every row once per seed, each override a field of the
    demo config with the right type, and each trial maps back to its table row."""
    from experiments import artfr_ablations as abl

    trials = abl.get_hyper(hyper, seeds=(0, 1))
    assert len(trials) == 2 * len(abl.ROWS)
    launch.check_trials(launch.load_config(abl.CONFIG), trials)
    rows = [abl.row_of(t) for t in trials[: len(abl.ROWS)]]
    assert rows == [label for label, _, _ in abl.ROWS]
    assert trials[len(abl.ROWS)]["config.seed"] == 1
    assert {"config.model.use_transformer", "config.model.condition_mode"} <= {
        k for t in trials for k in t
    }
