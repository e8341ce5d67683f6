"""notebooks: all three execute on a small generated demo (a failing cell fails the test) and are
stored without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")

import nbformat  # noqa: E402

from landmarks.tools import notebooks as nbk  # noqa: E402
from landmarks.utils import LandmarksError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def nb_env(tmp_path_factory, fake_model):
    """One small pipeline run shared by the notebooks: a fake DELG model, the notebook-sized demo
    under WORK/small_demo (where notebook 02 looks), features + predict + validate done once."""
    root = tmp_path_factory.mktemp("notebooks")
    model = fake_model
    work = root / "work"
    env = nbk.notebook_env(
        data_dir=work / "small_demo" / "data",
        work_dir=work,
        model=model,
        submission=root / "submission.csv",
        small=True,
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("LANDMARKS_CONFIG", "LANDMARKS_SET"):
            mp.delenv(k, raising=False)
        run = nbk.small_demo(nbk.context())
        result = nbk.run_pipeline(run)
    assert result["report"].exists()
    return {"env": env, "root": root, "run": run}


def test_notebooks_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_data.ipynb", "02_pipeline.ipynb", "03_errors.ipynb"]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{p.name}: strip outputs"
        assert not nbk.strip_outputs(nb)


EXPECT = {
    "01_data": ["test non-landmark images", "Class sizes"],
    "02_pipeline": ["global + verification", "Validation report", "good:"],
    "03_errors": ["most confident wrong predictions", "non-landmark images scored highest"],
}


@pytest.mark.parametrize("name", [p.stem for p in NOTEBOOKS])
def test_notebook_executes(nb_env, name):
    out = nb_env["root"] / "html"
    html = nbk.run_notebooks(out, REPO / "notebooks", env=nb_env["env"], timeout=300, only=[name])[0]
    text = html.read_text(encoding="utf-8")
    assert "data:image/png;base64" in text  # figures were produced and embedded
    for phrase in EXPECT.get(name, []):
        assert phrase in text, (name, phrase)
    assert "Traceback" not in text


def test_failing_cell_fails_and_cli(tmp_path, capsys):
    d = tmp_path / "nbs"
    d.mkdir()
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("import os\nprint(os.environ['LANDMARKS_WORK_DIR'])"),
            nbformat.v4.new_code_cell("raise ValueError('broken cell')"),
        ]
    )
    nbformat.write(nb, d / "bad.ipynb")
    with pytest.raises(LandmarksError, match="bad.ipynb failed.*broken cell"):
        nbk.run_notebooks(tmp_path / "html", d, env={"LANDMARKS_WORK_DIR": "/somewhere"}, timeout=60)
    assert "/somewhere" in (tmp_path / "html" / "bad.html").read_text()  # partial HTML kept for reading
    assert nbk.main(["--out", str(tmp_path / "html2"), "--notebooks", str(d), "--timeout", "60"]) == 1
    assert "broken cell" in capsys.readouterr().err
    # --strip leaves a notebook without outputs
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="x")]
    nb.cells[0].execution_count = 3
    nbformat.write(nb, d / "bad.ipynb")
    assert nbk.main(["--strip", "--notebooks", str(d)]) == 0
    cell = nbformat.read(d / "bad.ipynb", as_version=4).cells[0]
    assert cell.outputs == [] and cell.execution_count is None


def test_context_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LANDMARKS_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("LANDMARKS_WORK_DIR", "rel/work")
    monkeypatch.setenv("LANDMARKS_SET", json.dumps(["knn.k=7"]))
    monkeypatch.setenv("LANDMARKS_SMALL_DEMO", "0")
    monkeypatch.delenv("LANDMARKS_CONFIG", raising=False)
    ctx = nbk.context()
    assert ctx.data_dir == tmp_path / "d" and ctx.work_dir.is_absolute() and ctx.work_dir.parts[-2:] == ("rel", "work")
    assert ctx.cfg.knn.k == 7 and not ctx.small and nbk.pipeline_context(ctx) is ctx
    small = nbk.small_demo(ctx)
    assert small.data_dir == ctx.work_dir / "small_demo" / "data" and small.cfg.demo.num_landmarks == 8
    assert small.cfg.knn.k == 7 and ctx.cfg.demo.num_landmarks != 8  # copy, overrides kept
    monkeypatch.setenv("LANDMARKS_SET", "knn.k=7")
    with pytest.raises(LandmarksError, match="JSON list"):
        nbk.context()
