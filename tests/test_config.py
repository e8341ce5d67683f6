"""Config: defaults, file loading, command-line overrides, clear errors."""

import subprocess
import sys

import pytest

from landmarks.cache import settings_hash
from landmarks.config import Config, ConfigError, dump_config, load_config


def test_overrides_are_typed():
    cfg = load_config(None, ["knn.k=7", "verify.enabled=false", "extract.global_scales=0.5,1.0", "vote.power=2"])
    assert cfg.knn.k == 7 and isinstance(cfg.knn.k, int)
    assert cfg.verify.enabled is False
    assert cfg.extract.global_scales == (0.5, 1.0)
    assert cfg.vote.power == 2.0


def test_yaml_and_toml_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("knn:\n  k: 11\nverify:\n  matcher: kdtree\n")
    cfg = load_config(y, ["knn.k=12"])
    assert cfg.knn.k == 12 and cfg.verify.matcher == "kdtree"
    t = tmp_path / "c.toml"
    t.write_text("[vote]\nmethod = 'host'\n")
    assert load_config(t).vote.method == "host"


@pytest.mark.parametrize("bad", ["knn.nope=1", "knn.k=abc", "knn=3", "novalue"])
def test_bad_overrides_name_the_key(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["knn.k=5", "extract.global_scales=1.0"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert settings_hash(again, "knn") == settings_hash(cfg, "knn")
    assert settings_hash(Config(), "knn") != settings_hash(cfg, "knn")


def test_cli_config_show_and_error():
    ok = subprocess.run(
        [sys.executable, "-m", "landmarks", "config", "show", "--set", "knn.k=3"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "k: 3" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "landmarks", "config", "show", "--set", "knn.zz=3"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "unknown config key 'knn.zz'" in bad.stderr
    assert "Traceback" not in bad.stderr
