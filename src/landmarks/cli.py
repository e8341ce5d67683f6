"""`landmarks` command line: one sub-command per pipeline stage.

Each stage module exposes ``register_cli(subparsers, common)``; it adds its sub-command with
``parents=[common]`` (shared --config/--set/--data-dir/--work-dir/--model/--submission
options) and sets ``func`` to a handler ``func(args, cfg) -> int``.  Stage modules import
TensorFlow lazily, so light commands (``gap``, ``config show``) start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from landmarks.config import ConfigError, dump_config, load_config
from landmarks.utils import LandmarksError, error_text, setup_logging

# Modules that contribute sub-commands (each has register_cli), in pipeline order for --help.
STAGE_MODULES = [
    "demo",
    "dataset_import",
    "holdout",
    "metrics",
    "export",
    "train",
    "adapt",
    "extract",
    "whiten",
    "knn",
    "verify",
    "calibrate",
    "predict",
    "validate",
    "hard",
    "bench",
    "show",
]


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--config", default=None, help="YAML/TOML config file (defaults: `landmarks config show`)")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set knn.k=50",
    )
    g.add_argument("--data-dir", default="data/demo", help="Kaggle-layout dataset directory")
    g.add_argument("--work-dir", default="work", help="features, indexes and reports")
    g.add_argument("--model", default="models/default", help="DELG SavedModel directory")
    g.add_argument("--submission", default="submission/submission.csv", help="submission CSV path")
    g.add_argument("-v", "--verbose", action="store_true")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="landmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_parser()

    p = sub.add_parser("config", parents=[common], help="show the effective configuration")
    p.add_argument("action", choices=["show"])
    p.set_defaults(func=lambda args, cfg: print(dump_config(cfg), end="") or 0)

    for name in STAGE_MODULES:
        importlib.import_module(f"landmarks.{name}").register_cli(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(getattr(args, "verbose", False))
    try:
        cfg = load_config(args.config, args.overrides)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The error as one line; OS errors (full disk, permissions, ...) as '[Errno N] reason: path'."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return f"{type(e).__name__}: {error_text(e)}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
