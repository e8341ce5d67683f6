"""Config: defaults, file loading, command-line overrides, clear errors."""

import subprocess
import sys

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from landmarks.config import Config, ConfigError, check_config, dump_config, load_config
from landmarks.utils.cache import settings_hash


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


# -- ranges, checked at load (issue 21 item 2) ------------------------------------------------------
def _landmarks(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "landmarks", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _one_line_failure(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


@pytest.mark.parametrize(
    "override,shown,allowed",
    [
        ("vote.power=nan", "nan", "[0, 64]"),
        ("vote.neighbours=-3", "-3", "[1, 100000]"),
        ("extract.global_scales=abc", "'abc'", "(0, 8]"),
        ("verify.num_to_rerank=-1", "-1", "[1, 100000]"),
        ("knn.k=-5", "-5", "[1, 100000]"),
        ("extract.shards=0", "0", "[1, 1000000]"),
        ("extract.max_shard_images=-1", "-1", "[0, 2147483647]"),
        ("bench.knn_sizes=10,-2", "[10, -2]", "[1, 10000000000]"),
        ("vote.suppression_quantile=inf", "inf", "[0, 1]"),
    ],
)
def test_out_of_range_settings_fail_at_load_before_any_work(tmp_path, override, shown, allowed):
    """`landmarks features` (what `make features` runs) stops at load: no work dir, one line with key/value/range."""
    work = tmp_path / "work"
    r = _landmarks("features", "--split", "test", "--data-dir", tmp_path / "no", "--work-dir", work, "--set", override)
    err = _one_line_failure(r)
    key = override.split("=")[0]
    assert f"'{key}'" in err and shown in err and allowed in err, err
    assert not work.exists()


def test_ranges_are_checked_in_files_too(tmp_path):
    (tmp_path / "c.yaml").write_text("vote:\n  power: .nan\nknn:\n  k: 5\n")
    with pytest.raises(ConfigError, match=r"'vote.power': nan is not finite; allowed: a finite number in \[0, 64\]"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.toml").write_text("[verify]\nnum_to_rerank = -1\n")
    with pytest.raises(ConfigError, match=r"'verify.num_to_rerank': -1 is out of range"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "d.yaml").write_text("knn:\n  k: 2.5\n")
    with pytest.raises(ConfigError, match="cannot read 2.5 as an integer"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("knn:\n  k: true\n")  # a boolean is not a number
    with pytest.raises(ConfigError, match="'knn.k'"):
        load_config(tmp_path / "e.yaml")


def test_relations_between_settings_are_checked():
    with pytest.raises(ConfigError, match="adapt.scale_min=3.0, adapt.scale_max=2.0"):
        load_config(None, ["adapt.scale_min=3"])
    with pytest.raises(ConfigError, match="crop_size <= max_side"):
        load_config(None, ["adapt.crop_size=1024"])


def test_every_numeric_setting_declares_a_range():
    """A new int/float (or tuple of numbers) field without `ranged(...)` fails here, not in a user's run."""
    from dataclasses import fields
    from typing import get_args, get_origin, get_type_hints

    missing = []
    for sec in fields(Config):
        section = sec.default_factory()
        hints = get_type_hints(type(section))
        for f in fields(section):
            typ = hints[f.name]
            item = get_args(typ)[0] if get_origin(typ) is tuple else typ
            if item in (int, float) and "range" not in f.metadata:
                missing.append(f"{sec.name}.{f.name}")
            if get_origin(typ) is not tuple:
                assert typ is not tuple, f"{sec.name}.{f.name}: give the tuple's item type"
    assert not missing
    check_config(Config())  # the defaults are within their own ranges


def test_options_standing_in_for_settings_are_checked_the_same_way(tmp_path):
    from landmarks.config import check_setting

    assert check_setting("extract.shards", 3) == 3
    with pytest.raises(ConfigError, match=r"'extract.jobs': 0 is out of range; allowed: an integer in \[1, 1024\]"):
        check_setting("extract.jobs", 0)
    r = _landmarks("features", "--data-dir", tmp_path, "--work-dir", tmp_path / "w", "--shards", "0", "--split", "test")
    assert r.returncode == 1 and "Traceback" not in r.stderr  # after the stage's settings line, one error line
    assert [line for line in r.stderr.splitlines() if "error" in line] == [
        "landmarks features: error: config key 'extract.shards': 0 is out of range; allowed: an integer in [1, 1000000]"
    ]


# -- malformed CONFIG files (issue 21 item 5) --------------------------------------------------------
@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("bad.yaml", b"knn:\n  k: [1, 2\nvote: {", "bad YAML at line"),
        ("tabs.yaml", b"knn:\n\tk: 3\n", "bad YAML"),
        ("bad.toml", b"[knn\nk = 3\n", "bad TOML"),
        ("dup.toml", b"[knn]\nk = 3\nk = 4\n", "bad TOML"),
        ("binary.yaml", bytes(range(256)) * 4, "not UTF-8 text"),
        ("latin1.yaml", "knn:\n  k: 3 # \xe9\n".encode("latin-1"), "not UTF-8 text"),
        ("list.yaml", b"- 1\n- 2\n", "must hold a mapping of sections"),
        ("scalar.toml.yaml", b"hello\n", "must hold a mapping of sections"),
        ("section.yaml", b"knn: 3\n", "is a section"),
        ("unknown.yaml", b"knnn:\n  k: 3\n", "unknown config key 'knnn'"),
    ],
)
def test_malformed_config_file_is_one_line_naming_it(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    r = _landmarks("config", "show", "--config", p)
    err = _one_line_failure(r)
    assert needle in err and str(p) in err, err


def test_config_path_that_is_not_a_file(tmp_path):
    import os

    err = _one_line_failure(_landmarks("config", "show", "--config", tmp_path))
    assert "is a directory" in err and str(tmp_path) in err
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # must not block on the FIFO
    err = _one_line_failure(_landmarks("config", "show", "--config", fifo))
    assert "not a regular file" in err and str(fifo) in err
    err = _one_line_failure(_landmarks("config", "show", "--config", tmp_path / "none.yaml"))
    assert "not found" in err and "none.yaml" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert _landmarks("config", "show", "--config", empty).returncode == 0  # an empty file: the defaults


# -- hypothesis: any override loads into a valid config or fails at load with one line ------------
def _declared_fields():
    from dataclasses import fields
    from typing import get_type_hints

    out = []
    for sec in fields(Config):
        section = sec.default_factory()
        hints = get_type_hints(type(section))
        out += [(f"{sec.name}.{f.name}", hints[f.name], f.metadata.get("range")) for f in fields(section)]
    return out


FIELDS = _declared_fields()
KEYS = [k for k, _, _ in FIELDS]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)

odd_values = st.sampled_from(
    ["nan", "-nan", "inf", "-inf", "1e400", "-1", "0", "1", "2.5", "1e3", "0x10", "", " ", "abc", "1,2", "[1, 2]",
     "true", "no", "None", "9" * 30, "-" + "9" * 30, "1_000", "0.5,abc", "((1))", "=", "a=b", "\x00", "\udc80", "é"]
)  # fmt: skip
values = st.one_of(
    odd_values,
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=12),
    st.lists(st.floats(-10, 10, allow_nan=False).map(repr), min_size=0, max_size=4).map(",".join),
)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS),
    st.sampled_from([k.split(".")[0] for k in KEYS] + ["", ".", "knn.", ".k", "knn.k.x", "knn..k", "KNN.K"]),
    st.text(max_size=10),
)
items = st.one_of(st.tuples(keys, values).map("=".join), st.text(max_size=15))


@SETTINGS
@given(st.lists(items, max_size=4))
def test_any_override_strings_load_valid_or_fail_with_one_line(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        event("refused")
        return
    event("loaded")
    check_config(cfg)  # everything loaded is within its type and range
    last = {k.strip(): v for k, v in (o.split("=", 1) for o in overrides)}  # the last override of a key wins
    for key, value in last.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        if isinstance(got, float):
            assert got == float(value)
        elif isinstance(got, bool):
            assert value.strip().lower() in (("1", "true", "yes", "on") if got else ("0", "false", "no", "off"))
        elif isinstance(got, int):
            assert got == int(float(value)) if "." in value or "e" in value.lower() else got == int(value)


def _valid_value(typ, rng):
    """A strategy of values a field accepts: within its type and range."""
    from typing import Literal, get_args, get_origin

    if get_origin(typ) is tuple:  # items of a comma-separated list: no commas, brackets or blank items
        item = get_args(typ)[0]
        items = st.from_regex(r"[\w./-]{1,8}", fullmatch=True) if item is str else _valid_value(item, rng)
        return st.lists(items, min_size=1, max_size=4).map(tuple)
    if get_origin(typ) is Literal:
        return st.sampled_from(get_args(typ))
    if typ is bool:
        return st.booleans()
    if typ is str:
        return st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=10)
    lo, hi = rng.lo, min(rng.hi, 2**31 - 1)
    if typ is int:
        return st.integers(int(lo) + rng.lo_open, int(hi) - rng.hi_open)
    return st.floats(lo, hi, exclude_min=rng.lo_open, exclude_max=rng.hi_open, allow_nan=False)


def _as_override(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_as_override(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


@SETTINGS
@given(
    st.lists(st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f[0]), _valid_value(f[1], f[2]))), max_size=6)
)
def test_override_round_trip_through_dump(pairs):
    """Valid values as `--set` strings load exactly; dump_config -> load gives an equal config."""
    import tempfile
    from pathlib import Path

    overrides = [f"{k}={_as_override(v)}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:  # only a relation between two settings may refuse valid single values
        assert "must hold" in str(e) and "\n" not in str(e)
        return
    for key, value in dict(pairs).items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        assert got == value and type(got) is type(value), (key, got, value)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dump.yaml"
        p.write_text(dump_config(cfg), encoding="utf-8")
        again = load_config(p)
    assert again == cfg and again.to_dict() == cfg.to_dict()
