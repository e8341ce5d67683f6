"""Where every stage keeps its files inside WORK_DIR, named in one place.

Stage outputs that depend on settings are named after them (as hloc names ``feats-<conf>.h5``):
``knn-<hash>.npz`` from the knn and whiten sections, ``verified-<hash>.npz`` from those plus
verify, ``whiten-<hash>.npz`` from whiten.  These variants sit side by side, so switching a knn,
whiten or verify setting and switching it back costs nothing.  Feature shards are not named after
settings: there is one set per split, and their rows are keyed by what determines them.  The hash
covers settings only (``landmarks.utils.cache.output_name``); each file also stores the full fingerprint
of its inputs, and a stage redoes its work when that no longer matches (``landmarks.utils.cache``,
docs/cache.md).  docs/design.md has the file formats.

    WORK_DIR/
      adapt/model/                                                       landmarks adapt (the default MODEL)
      features/<split>/shard-*.h5, local-cache-*.h5, store-index.npz   landmarks features / local-features
      whiten-<h>.npz                                                     landmarks whiten (when on)
      knn-<h>.npz                                                        landmarks knn
      verified-<h>.npz                                                   landmarks verify
      calibration-<h>.npz                                                landmarks calibrate
      report.md, plots/                                                  landmarks validate
      bench.md, hard/, adapt/, train/, show/, bench/, notebooks/         tools
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from landmarks.utils.cache import output_name


@dataclass(frozen=True)
class WorkLayout:
    """The paths of WORK_DIR; the CLI, the Makefile's commands, notebooks and tools all use it."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # -- features stage ---------------------------------------------------------------------
    @property
    def features_root(self) -> Path:
        return self.root / "features"

    def features(self, split: str) -> Path:
        return self.features_root / split

    # -- settings-named stage outputs ---------------------------------------------------------
    def whiten(self, cfg) -> Path:
        return self.root / output_name("whiten", cfg)

    def knn(self, cfg) -> Path:
        return self.root / output_name("knn", cfg)

    def verified(self, cfg) -> Path:
        return self.root / output_name("verify", cfg, prefix="verified")

    def calibration(self, cfg) -> Path:
        return self.root / output_name("calibrate", cfg, prefix="calibration")

    # -- reports and tools --------------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def tool(self, name: str) -> Path:
        """Working folder of a tool that is not a stage (hard, adapt, show, bench, notebooks)."""
        return self.root / name
