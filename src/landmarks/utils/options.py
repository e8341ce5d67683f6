"""The shared command-line options of every `landmarks` command (and of tools with a main() of
their own, such as the notebooks runner): --config, --set, -v, and the paths a command uses.
Help shows each option's default."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' for options whose default means something (not flags, None or [])."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


_OPTION_SPECS = {
    "data_dir": (("--data-dir",), dict(default="data/demo", help="Kaggle-layout dataset directory")),
    "work_dir": (("--work-dir",), dict(default="work", help="features, indexes, reports and logs")),
    "model": (
        ("--model",),
        dict(
            default=None,
            help="DELG SavedModel directory (default: the default model with its local head adapted to "
            "DATA_DIR's train images; models/default with --no-adapt or verify.enabled=false)",
        ),
    ),
    # tools whose model is the zero-training one unless given (adapt compares against it; the hard
    # protocol builds its own splits, which an adaptation on DATA_DIR would not describe)
    "zero_model": (("--model",), dict(default="models/default", help="DELG SavedModel directory")),
    "submission": (
        ("--submission",),
        dict(
            default=None,
            help="submission CSV (default: submission/submission.csv for WORK_DIR work, else WORK_DIR/submission.csv)",
        ),
    ),
}


def common(*names: str) -> list[argparse.ArgumentParser]:
    """Parent parsers for a command: --config, --set, -v, and the named shared options."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--config", default=None, help="YAML/TOML config file (defaults: `landmarks config show`)")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set knn.k=50",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log every message and the settings on the console")
    for name in names:
        flags, kw = _OPTION_SPECS[name]
        g.add_argument(*flags, **kw)
    return [p]
