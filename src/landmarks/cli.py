"""`landmarks` command line: `landmarks run TARGET`, one command per stage, and the tools.

The pipeline commands (`run` and one per stage: features, whiten, knn, local-features, verify,
predict, validate) are made here from the stage graph (`landmarks.stages.STAGES`) by one
generic adapter.  Tool modules (import, holdout, gap, model, adapt, train, validate-hard,
bench, show, demo-data) expose ``register_cli(subparsers, common)``: ``common(*names)`` gives the
parent parsers of the shared options that command uses (always --config/--set/-v; then any of
data_dir, work_dir, model, zero_model, submission), so each command's help lists only its own options.
Stage modules import TensorFlow lazily, so light commands (``gap``, ``config show``) start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from landmarks import __version__
from landmarks.config import ConfigError, check_setting, dump_config, load_config
from landmarks.stages import STAGES, TARGETS, Run, default_submission, run_stage, run_target
from landmarks.utils import LandmarksError, error_text, setup_logging
from landmarks.utils.options import Parser, common

# Modules that contribute tool sub-commands (each has register_cli), in pipeline order for --help.
TOOL_MODULES = [
    "datasets.demo",
    "datasets.dataset_import",
    "datasets.holdout",
    "evaluation.metrics",
    "delg.export",
    "delg.train",
    "adapt",
    "evaluation.hard",
    "tools.bench",
    "tools.show",
]
# The per-stage commands made from the graph (demo-data, model and adapt are tool commands with
# options of their own; `landmarks run demo-data|model|adapt` runs those stages).
STAGE_COMMANDS = ["features", "whiten", "knn", "local-features", "verify", "calibrate", "predict", "validate"]
RUN_OPTS = ("data_dir", "work_dir", "model", "submission")


def _run_options(p: argparse.ArgumentParser, adapt: bool = True) -> None:
    g = p.add_argument_group("run options")
    g.add_argument("--jobs", type=int, default=None, help="parallel worker processes (default: extract.jobs)")
    g.add_argument("--shards", type=int, default=None, help="shards per split (default: extract.shards)")
    g.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDR",
        help="dask scheduler address, e.g. tcp://host:8786 (default: extract.scheduler; empty = local)",
    )
    if adapt:
        g.add_argument(
            "--no-adapt",
            dest="adapt",
            action="store_false",
            help="use the zero-training models/default instead of adapting its local head",
        )


def _make_run(args, cfg):

    for key, value in (("extract.shards", args.shards), ("extract.jobs", args.jobs)):
        if value is not None:
            check_setting(key, value)  # options standing in for settings: checked as the config is

    options = {k: getattr(args, k) for k in getattr(args, "stage_options", ())}
    return Run(
        cfg,
        args.data_dir,
        args.work_dir,
        args.model,
        args.submission,
        adapt=getattr(args, "adapt", True),
        jobs=args.jobs,
        shards=args.shards,
        scheduler=args.scheduler,
        options=options,
    )


def _cmd_run(args, cfg) -> int:

    result = run_target(args.target, _make_run(args, cfg))
    if result.output is not None:
        print(result.output)
    return 0


def _cmd_stage(args, cfg) -> int:

    result = run_stage(args.command, _make_run(args, cfg))
    if result.output is not None:
        print(result.output)
    return 0


def _add_stage_commands(sub) -> None:

    p = sub.add_parser(
        "run",
        parents=common(*RUN_OPTS),
        help="run a target and every stage it needs, in order, skipping what is up to date",
        description="Run TARGET and the stages it needs (stage graph: src/landmarks/stages.py); "
        "checks the inputs and output paths first; one console line per stage, the full log in "
        "WORK_DIR/logs/run.log.",
    )
    p.add_argument("target", nargs="?", default="predict", choices=TARGETS, help="stage to bring up to date")
    _run_options(p)
    p.set_defaults(func=_cmd_run)
    by_name = {s.name: s for s in STAGES}
    for name in STAGE_COMMANDS:
        st = by_name[name]
        p = sub.add_parser(name, parents=common(*RUN_OPTS), help=st.help, description=st.help + " (this stage only)")
        _run_options(p)
        dests = []
        for flags, kw in st.options:
            dests.append(p.add_argument(*flags, **kw).dest)
        p.set_defaults(func=_cmd_stage, stage_options=tuple(dests))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="landmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"landmarks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("config", parents=common(), help="show the effective configuration")
    p.add_argument("action", choices=["show"])
    p.set_defaults(func=lambda args, cfg: print(dump_config(cfg), end="") or 0)

    _add_stage_commands(sub)
    for name in TOOL_MODULES:
        importlib.import_module(f"landmarks.{name}").register_cli(sub, common)
    return parser


def _fill_defaults(args, cfg) -> None:
    """Paths a tool left to the graph: the run's model and the per-run submission path."""

    if hasattr(args, "submission") and args.submission is None:
        args.submission = str(default_submission(getattr(args, "work_dir", "work")))
    hard_split = getattr(args, "hard_split", None)  # show --hard-split: the zero-training model by default
    if hasattr(args, "model") and args.model is None and args.func not in (_cmd_run, _cmd_stage) and not hard_split:
        # show, bench: the model the run of DATA_DIR / WORK_DIR uses
        run = Run(cfg, getattr(args, "data_dir", "data/demo"), getattr(args, "work_dir", "work"))
        args.model = str(run.model_dir)


def _quiet_logging(verbose: bool) -> None:
    """Pipeline commands: warnings on the console (everything with -v); the stage graph prints one
    line per stage and keeps the full log in WORK_DIR/logs/run.log."""
    setup_logging(verbose)
    for h in logging.getLogger().handlers:
        h.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # joblib's resource tracker (a child process) warns about "leaked" semaphores after a Ctrl-C
    quiet = "ignore:resource_tracker:UserWarning"
    if quiet not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    if not verbose:  # loky restarting a worker (its memory-growth check) reruns the worker's tasks: no news
        warnings.filterwarnings("ignore", message="A worker stopped while some jobs", category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.func in (_cmd_run, _cmd_stage):
        _quiet_logging(args.verbose)
    else:
        setup_logging(getattr(args, "verbose", False))
    try:
        cfg = load_config(args.config, args.overrides)
        _fill_defaults(args, cfg)
        rc = args.func(args, cfg)
        sys.stdout.flush()  # a closed pipe (`landmarks gap ... | head -1`) shows up here, not at exit
        return int(rc or 0)
    except BrokenPipeError:
        # the reader went away: stop quietly, and keep Python from failing again on its exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell tool killed by the pipe
    except (LandmarksError, ConfigError, OSError) as e:
        logging.getLogger("landmarks").debug("error", exc_info=True)
        print(f"landmarks {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(str(e) if str(e) else "interrupted: rerun the same command to resume", file=sys.stderr, flush=True)
        _silence_stderr()
        return 130


def _silence_stderr() -> None:
    """After Ctrl-C: nothing more on the console at exit (joblib's and TensorFlow's shutdown
    tracebacks); registered last, so it runs before their exit handlers."""
    import atexit

    def quiet():
        try:
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        except (OSError, ValueError):  # pragma: no cover
            pass

    atexit.register(quiet)


def _one_line(e: BaseException) -> str:
    """The error as one line; OS errors (full disk, permissions, ...) as '[Errno N] reason: path'."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return f"{type(e).__name__}: {error_text(e)}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
