"""Shared helpers: L2 normalisation, content digests, image links, build-then-swap folders."""

from __future__ import annotations

import os

import numpy as np
import pytest

from landmarks.utils import available_cores, building_dir, file_digest, l2_normalize, link_file


def test_l2_normalize_rows_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], np.float64)
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(np.array([0.0, 2.0])), [0.0, 1.0])  # 1-D: the vector itself
    np.testing.assert_allclose(l2_normalize(x.T, axis=0), y.T)
    assert l2_normalize(np.zeros((0, 8), np.float32)).shape == (0, 8)


def test_file_digest_is_a_content_id(tmp_path):
    a, b, c = tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "c.jpg"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other bytes")
    assert file_digest(a) == file_digest(str(b)) != file_digest(c)
    assert len(file_digest(a)) == 16 and int(file_digest(a), 16) >= 0


def test_link_file_modes(tmp_path):
    src = tmp_path / "src.jpg"
    src.write_bytes(b"pixels")
    for mode in ("symlink", "hardlink", "copy"):
        dst = tmp_path / mode / "a" / "b" / "x.jpg"
        link_file(src, dst, mode)
        assert dst.read_bytes() == b"pixels"
    assert os.readlink(tmp_path / "symlink" / "a" / "b" / "x.jpg") == str(src.resolve())
    assert os.stat(tmp_path / "hardlink" / "a" / "b" / "x.jpg").st_ino == src.stat().st_ino
    assert os.stat(tmp_path / "copy" / "a" / "b" / "x.jpg").st_ino != src.stat().st_ino
    with pytest.raises(ValueError):
        link_file(src, tmp_path / "y.jpg", "move")


def test_building_dir_swaps_in_only_on_success(tmp_path):
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "old.csv").write_text("old")
    with pytest.raises(RuntimeError):
        with building_dir(out) as tmp:
            (tmp / "new.csv").write_text("new")
            raise RuntimeError("killed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["old.csv"]  # readers still see the old one
    with building_dir(out) as tmp:
        assert not any(tmp.iterdir())  # the leftover of the failed run is cleared
        (tmp / "new.csv").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.csv"]
    assert not tmp.exists()


def test_available_cores():
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
