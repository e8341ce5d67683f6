"""Run the notebooks in notebooks/ (nbclient) and write their HTML (nbconvert); notebook helpers.

    python -m landmarks.tools.notebooks --out WORK_DIR/notebooks [--data-dir D --work-dir W --model M ...]

Notebooks take their paths from environment variables so a test or ``make notebooks`` can point
them anywhere: LANDMARKS_DATA_DIR, LANDMARKS_WORK_DIR, LANDMARKS_MODEL, LANDMARKS_SUBMISSION,
LANDMARKS_CONFIG, LANDMARKS_SET (JSON list of section.key=value overrides) and
LANDMARKS_SMALL_DEMO (1 = notebook 02 runs the pipeline on a small generated demo under
WORK_DIR/small_demo, so it takes a minute or two on a laptop; 0 = on DATA_DIR/WORK_DIR itself).
Unset variables fall back to the demo defaults (data/demo, work, models/default).

The .ipynb files in the repository carry no outputs: this runner executes an in-memory copy and
writes only HTML; ``--strip`` removes outputs from notebooks saved by hand from Jupyter.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from landmarks.config import ConfigError, load_config
from landmarks.stages import Run, run_target
from landmarks.utils import LandmarksError, atomic_path, setup_logging
from landmarks.utils.options import common

log = logging.getLogger(__name__)

ENV = {
    "data_dir": "LANDMARKS_DATA_DIR",
    "work_dir": "LANDMARKS_WORK_DIR",
    "model": "LANDMARKS_MODEL",
    "submission": "LANDMARKS_SUBMISSION",
    "config": "LANDMARKS_CONFIG",
    "overrides": "LANDMARKS_SET",
    "small": "LANDMARKS_SMALL_DEMO",
}
DEFAULTS = {
    "data_dir": "data/demo",
    "work_dir": "work",
    "model": "models/default",
    "submission": "submission/submission.csv",
}
# The notebook-sized demo (DemoConfig fields): ~35 train and ~25 test images of 256 px.
SMALL_DEMO = {
    "num_landmarks": 8,
    "views_per_landmark": 4,
    "test_views_per_landmark": 2,
    "unseen_landmarks": 2,
    "num_distractors": 6,
    "image_size": 256,
    "families": 4,
    "jobs": 1,
}
# Settings for the small run: one shard, in-process workers (process start-up would dominate).
SMALL_OVERRIDES = {"extract": {"shards": 1, "jobs": 1}, "verify": {"jobs": 1}}


def repo_root() -> Path:
    """The checkout this package runs from (notebooks/ lives there), else the current directory."""
    here = Path(__file__).resolve()
    for p in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        if (p / "notebooks").is_dir() and (p / "src" / "landmarks").is_dir():
            return p
    return Path.cwd()


@dataclass
class Context:
    """Paths and config one notebook works on."""

    data_dir: Path
    work_dir: Path
    model: Path
    submission: Path
    cfg: object
    small: bool = True

    def __repr__(self) -> str:
        return (
            f"Context(data_dir={str(self.data_dir)!r}, work_dir={str(self.work_dir)!r}, "
            f"model={str(self.model)!r}, submission={str(self.submission)!r}, small_demo={self.small})"
        )


def context() -> Context:
    """Context from the LANDMARKS_* environment variables (demo defaults, relative to the repo)."""

    root = repo_root()

    def path(key: str) -> Path:
        value = os.environ.get(ENV[key]) or DEFAULTS[key]
        p = Path(value).expanduser()
        return p if p.is_absolute() else (root / p)

    raw = os.environ.get(ENV["overrides"], "").strip()
    try:
        overrides = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        raise LandmarksError(f"{ENV['overrides']} must be a JSON list of section.key=value strings") from None
    cfg = load_config(os.environ.get(ENV["config"]) or None, overrides)
    small = os.environ.get(ENV["small"], "1").strip().lower() not in ("0", "false", "no", "off")
    return Context(path("data_dir"), path("work_dir"), path("model"), path("submission"), cfg, small)


def small_demo(ctx: Context) -> Context:
    """The notebook-sized demo: data and work under WORK_DIR/small_demo, same model."""
    cfg = copy.deepcopy(ctx.cfg)
    cfg.demo = replace(cfg.demo, **SMALL_DEMO)
    for section, values in SMALL_OVERRIDES.items():
        setattr(cfg, section, replace(getattr(cfg, section), **values))
    base = ctx.work_dir / "small_demo"
    return Context(base / "data", base / "work", ctx.model, base / "submission.csv", cfg, True)


def pipeline_context(ctx: Context) -> Context:
    """Where notebook 02 runs the pipeline: the small demo, or DATA_DIR/WORK_DIR when small is off."""
    return small_demo(ctx) if ctx.small else ctx


def run_pipeline(run: Context) -> dict:
    """The stage graph's `validate` target (demo data first for the small demo); returns the
    submission, the report and seconds per stage.  Every stage skips work that is already done."""

    graph_run = Run(run.cfg, run.data_dir, run.work_dir, run.model, run.submission, adapt=False, demo=run.small)
    result = run_target("validate", graph_run)
    return {"submission": result.outputs["predict"], "report": result.output, "seconds": result.seconds}


def last_validate_run(ctx: Context) -> Context:
    """The context of the last `make validate` (WORK_DIR/report.md); when there is none, the small
    demo run (executed here if needed)."""
    if (ctx.work_dir / "report.md").exists():
        return ctx
    run = small_demo(ctx)
    if not (run.work_dir / "report.md").exists():
        log.info("no validate run in %s: running the small demo pipeline", ctx.work_dir)
        run_pipeline(run)
    return run


def report_text(report: str | Path) -> str:
    """The report's markdown without its plot links (they are shown as images separately)."""
    text = Path(report).read_text(encoding="utf-8")
    return text.split("## Plots")[0].rstrip() + "\n"


# -- running notebooks ---------------------------------------------------------------------------
def notebook_paths(notebooks_dir: str | Path | None = None) -> list[Path]:
    """The *.ipynb files of `notebooks_dir` (default: the repo's notebooks/), sorted."""
    d = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    paths = sorted(d.glob("*.ipynb"))
    if not paths:
        raise LandmarksError(f"no notebooks (*.ipynb) in {d}")
    return paths


def strip_outputs(nb) -> bool:
    """Remove outputs and execution counts in place; True when something changed."""
    changed = False
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            changed = True
        cell["outputs"] = []
        cell["execution_count"] = None
        md = cell.get("metadata", {})
        for key in ("execution", "collapsed", "scrolled"):
            if key in md:
                md.pop(key)
                changed = True
    return changed


def _write_html(nb, path: Path) -> Path:
    """Export the executed notebook as HTML at `path` (atomically)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    with atomic_path(path) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return path


def run_notebook(
    path: str | Path, out_dir: str | Path, env: dict | None = None, timeout: int = 900, cwd: str | Path | None = None
) -> Path:
    """Execute one notebook (a failing cell raises LandmarksError) and write OUT/<name>.html.
    The HTML is written even when a cell fails, so the error can be read there."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path, out_dir = Path(path), Path(out_dir)
    nb = nbformat.read(path, as_version=4)
    strip_outputs(nb)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF start-up chatter out of the outputs
    full_env.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the HTML
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(cwd or repo_root())}},
    )
    html = out_dir / f"{path.stem}.html"
    t0 = time.time()
    try:
        client.execute(env=full_env)
    except CellExecutionError as e:
        _write_html(nb, html)
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise LandmarksError(f"notebook {path.name} failed ({last}); see {html}") from None
    except TimeoutError:
        _write_html(nb, html)
        raise LandmarksError(f"notebook {path.name}: a cell ran longer than {timeout}s; see {html}") from None
    _write_html(nb, html)
    log.info("notebook %s ran in %.0fs -> %s", path.name, time.time() - t0, html)
    return html


def notebook_env(
    data_dir=None, work_dir=None, model=None, submission=None, config=None, overrides=None, small: bool | None = None
) -> dict:
    """LANDMARKS_* variables for the given values (absolute paths); None values are left out."""
    env = {}
    for key, value in (
        ("data_dir", data_dir),
        ("work_dir", work_dir),
        ("model", model),
        ("submission", submission),
        ("config", config),
    ):
        if value:
            env[ENV[key]] = str(Path(value).resolve())
    if overrides:
        env[ENV["overrides"]] = json.dumps(list(overrides))
    if small is not None:
        env[ENV["small"]] = "1" if small else "0"
    return env


def run_notebooks(
    out_dir: str | Path,
    notebooks_dir: str | Path | None = None,
    env: dict | None = None,
    timeout: int = 900,
    only: list[str] | None = None,
) -> list[Path]:
    """Execute every notebook of notebooks_dir in name order; return the HTML paths."""
    from tqdm import tqdm

    paths = notebook_paths(notebooks_dir)
    if only:
        paths = [p for p in paths if p.stem in only or p.name in only]
        if not paths:
            raise LandmarksError(f"no notebook named {', '.join(only)}")
    out = []
    for p in tqdm(paths, desc="notebooks", unit="nb", disable=None):
        out.append(run_notebook(p, out_dir, env=env, timeout=timeout))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m landmarks.tools.notebooks`: execute the notebooks into HTML (or `--strip` their outputs); exit status."""
    import nbformat

    parser = argparse.ArgumentParser(
        prog="python -m landmarks.tools.notebooks",
        parents=common("data_dir", "work_dir", "model", "submission"),
        description="Execute notebooks/*.ipynb and write HTML into --out.",
    )
    parser.add_argument("--out", default=None, help="HTML output directory (default WORK_DIR/notebooks)")
    parser.add_argument("--notebooks", default=None, help="notebook directory (default: the repo's notebooks/)")
    parser.add_argument("--only", action="append", default=[], help="run only this notebook (repeatable)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    parser.add_argument(
        "--full", action="store_true", help="notebook 02 runs on DATA_DIR/WORK_DIR instead of a small demo"
    )
    parser.add_argument("--strip", action="store_true", help="strip outputs from the notebooks in place and exit")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.strip:
            for p in notebook_paths(args.notebooks):
                nb = nbformat.read(p, as_version=4)
                if strip_outputs(nb):
                    nbformat.write(nb, p)
                    print(f"stripped {p}")
            return 0
        env = notebook_env(
            args.data_dir, args.work_dir, args.model, args.submission, args.config, args.overrides, small=not args.full
        )
        out = Path(args.out) if args.out else Path(args.work_dir) / "notebooks"
        for html in run_notebooks(out, args.notebooks, env=env, timeout=args.timeout, only=args.only):
            print(html)
        return 0
    except (LandmarksError, ConfigError, FileNotFoundError) as e:
        print(f"landmarks.tools.notebooks: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
