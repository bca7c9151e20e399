"""The notebooks in ``notebooks/`` run headless: each is executed by a Jupyter kernel (nbclient)
with small parameters injected after its ``parameters`` cell, as papermill does; a cell that
raises fails the test with that cell's error. The training notebook runs first and the
restoration notebook restores with the model it trained, so the file trains once.

Needs the ``notebooks`` extra (``pip install -e '.[notebooks]'``)."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.test_trainers import command_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("restore_faces", "train_artfr")
COLAB = "https://colab.research.google.com/github/artfr-jax/artfr_jax/blob/main/notebooks/"


def _read(name: str):
    return nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)


def _index_of_parameters(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def execute(name: str, parameters: dict, timeout: int = 600):
    """Runs notebook ``name`` from ``notebooks/`` (its folder as the kernel's working directory)
    with ``parameters`` set in a cell after its ``parameters`` cell; returns the executed
    notebook. Raises ``nbclient.exceptions.CellExecutionError`` with the failing cell's error."""
    nb = _read(name)
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    injected = nbformat.v4.new_code_cell(source, id="injected-parameters")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_index_of_parameters(nb) + 1, injected)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": NOTEBOOKS}},
    )
    client.execute(env=command_env())
    return nb


def _outputs(nb, cell_id: str) -> list:
    return next(c for c in nb.cells if c.get("id") == cell_id).outputs


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def _has_image(outputs) -> bool:
    return any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and f"{COLAB}{name}.ipynb" in first.source
    assert "colab-badge.svg" in first.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "outputs not stripped"
    parameters = nb.cells[_index_of_parameters(nb)]
    assert parameters.cell_type == "code"
    setup = "\n".join(c.source for c in code[:1])
    assert 'IN_COLAB = "google.colab" in sys.modules' in setup
    assert 'REPO_URL = "https://github.com/artfr-jax/artfr_jax"' in setup
    # Colab-only lines sit under `if IN_COLAB:` (indented), so a headless kernel skips them.
    for c in code:
        for line in c.source.splitlines():
            if line.lstrip().startswith("!") or "google.colab import" in line:
                assert line.startswith((" ", "\t")), f"unguarded Colab line: {line!r}"


def test_notebooks_run_headless(tmp_path):
    """The training notebook (tiny config, 2-trial sweep), then the restoration notebook on its
    model; then the restoration notebook's clear error for a workdir without a model."""
    workdir = str(tmp_path / "train")
    sweep_root = str(tmp_path / "sweeps")
    train = execute(
        "train_artfr",
        dict(
            CONFIG="configs/art.py:tiny",
            WORKDIR=workdir,
            # Two steps per stage; the trials' stage-II programs are then the ones compiled in
            # the notebook (the learning-rate schedule depends on num_train_steps).
            OVERRIDES={"config.num_train_steps": 2, "config.stage1.config.num_train_steps": 2},
            NUM_RESTORE=4,
            NUM_HELD_OUT=4,
            SWEEP_ROOT=sweep_root,
            SWEEP_NAME="seeds",
            SWEEP_SEEDS=[0, 1],
            SWEEP_STEPS=2,
            SWEEP_PARALLEL=2,
        ),
    )
    assert "art step 2/2" in _text(_outputs(train, "train")), "no progress lines in the output"
    for cell in ("curves", "grid", "heldout"):
        assert _has_image(_outputs(train, cell)), f"no figure from cell {cell!r}"
    held_out = glob.glob(os.path.join(workdir, "notebook_held_out", "restored", "*.png"))
    assert len(held_out) == 4
    table = _outputs(train, "sweep-table")
    assert any("text/markdown" in o.get("data", {}) for o in table)
    with open(os.path.join(sweep_root, "seeds", "results.md"), encoding="utf-8") as f:
        assert len([line for line in f if line.startswith("|")]) == 2 + 2  # header, rule, trials
    # The trials read the notebook's tokenizer instead of training their own.
    assert not glob.glob(os.path.join(sweep_root, "seeds", "*", "stage1"))
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        assert any("train/loss" in json.loads(line) for line in f)

    out_dir = str(tmp_path / "restore")
    restore = execute(
        "restore_faces", dict(WORKDIR=workdir, NUM_SAMPLES=4, OUT_DIR=out_dir, MAX_SHOWN=6)
    )
    samples = sorted(os.listdir(os.path.join(out_dir, "samples")))
    # Four face crops and the whole photo (the detector finds its synthetic faces).
    assert samples == [f"face_{i:02d}.png" for i in range(4)] + ["group_photo.png"]
    pairs = os.listdir(os.path.join(out_dir, "restored", "side_by_side"))
    assert sorted(pairs) == samples
    assert os.listdir(os.path.join(out_dir, "restored", "restored_imgs")) == ["group_photo.png"]
    assert _has_image(_outputs(restore, "show"))
    assert os.path.getsize(os.path.join(out_dir, "restored.zip")) > 0

    with pytest.raises(nbclient.exceptions.CellExecutionError, match="No trained model"):
        execute("restore_faces", dict(WORKDIR=str(tmp_path / "none"), OUT_DIR=out_dir))
