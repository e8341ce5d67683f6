"""The config the stage unit tests were written for: raw global descriptors (no learned whitening,
which needs train labels and a whiten stage run first) and the vote's sim**8.  The default path,
Lw and power 0.5, is covered by test_whiten (whiten -> knn) and the end-to-end pipeline tests."""

from __future__ import annotations

from landmarks.config import Config

PLAIN = ("whiten.global_lw=false", "vote.power=8")


def plain_config() -> Config:
    """Config() with the learned whitening off and vote.power 8."""
    cfg = Config()
    cfg.whiten.global_lw = False
    cfg.vote.power = 8.0
    return cfg
