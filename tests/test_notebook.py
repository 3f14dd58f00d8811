"""The tutorial notebook (notebooks/ppo_step_by_step.ipynb): committed without outputs, and
executed end to end, cell by cell, as a reader would run it: a cell that raises fails the
test, with nbclient's CellExecutionError naming the cell and its traceback. Minutes on 2
CPU cores: it trains a tiny SFT model and runs 16 PPO iterations on IMDB."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "ppo_step_by_step.ipynb"


def imdb_dir() -> Path:
    """Where the notebook looks for IMDB: $IMDB_DIR, else ../shared/data/imdb beside the repository."""
    path = Path(os.environ.get("IMDB_DIR") or ROOT.parent / "shared" / "data" / "imdb").expanduser()
    return path if path.is_absolute() or path.exists() else ROOT / path


def test_the_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code, "no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} has outputs: clear them before committing"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count: clear it"


def python3_kernel(tmp_path: Path) -> Path:
    """A `python3` kernelspec that runs this interpreter (the tests' virtual environment),
    first on JUPYTER_PATH: a python3 kernel installed elsewhere (a user's
    ~/.local/share/jupyter) cannot pick another Python."""
    pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (pip install -e '.[test]')")
    folder = tmp_path / "jupyter" / "kernels" / "python3"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    return tmp_path / "jupyter"


def test_the_notebook_runs_end_to_end(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install -e '.[test]')")
    data = imdb_dir()
    missing = [name for name in ("imdb_train.jsonl.gz", "imdb_test.jsonl.gz") if not (data / name).is_file()]
    if missing:
        pytest.skip(f"no IMDB data in {data} ({', '.join(missing)}); set IMDB_DIR to run the notebook")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(python3_kernel(tmp_path)), *filter(None, [os.environ.get("JUPYTER_PATH")])]))
    monkeypatch.setenv("IMDB_DIR", str(data))
    monkeypatch.setenv("NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.delenv("SFT_RUN", raising=False)  # the notebook trains its own SFT model

    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, spec.argv

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # CellExecutionError (the cell, its traceback) fails the test
    outputs = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "resumed at iteration 16 of 20" in outputs
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert list((tmp_path / "work").glob("ppo_notebook_*/checkpoints/step_00000016"))
