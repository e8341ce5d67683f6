"""Feature shards on disk (HDF5) and the reader every later stage uses.

One shard file per extraction task, written atomically (temp name, then rename):

    ids                     str  [n]        image ids with features, in shard order
    global                  f32  [n, D]     L2-normalised global descriptors
    local/offsets           i64  [n + 1]    row range of image i in the arrays below
    local/keypoints         f32  [m, 2]     (x, y) box centres in original-image pixels
    local/descriptors       f16  [m, d]     L2-normalised local descriptors
    local/scales            f32  [m]        image scale each feature came from
    local/scores            f32  [m]        attention (keypoint) score
    failures/ids, failures/reasons  str     images that produced no features, and why
    attrs: fingerprint, split, shard, num_shards, has_local, n_requested, ...

Train-side local features fetched on demand are cached in the same format as
``local-cache-*.h5`` next to the shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from landmarks.utils import LandmarksError, atomic_path

SHARD_GLOB = "shard-*.h5"
CACHE_GLOB = "local-cache-*.h5"


@dataclass
class LocalFeatures:
    """Local features of one image: keypoints are (x, y) in original-image pixels."""

    keypoints: np.ndarray  # [n, 2] float32
    descriptors: np.ndarray  # [n, d] float32, unit rows
    scales: np.ndarray  # [n] float32
    scores: np.ndarray  # [n] float32

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @staticmethod
    def empty(dim: int = 128) -> "LocalFeatures":
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32),
                             np.zeros((0,), np.float32), np.zeros((0,), np.float32))


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.h5"


def write_shard(
    path: str | Path,
    ids: Sequence[str],
    global_desc: np.ndarray | None,
    local: Sequence[LocalFeatures] | None,
    failures: Sequence[tuple[str, str]] = (),
    attrs: dict | None = None,
    local_dtype: str = "float16",
) -> Path:
    """Write one shard atomically. `local` is None for global-only shards."""
    import h5py

    path = Path(path)
    n = len(ids)
    if global_desc is not None and global_desc.shape[0] != n:
        raise ValueError("global descriptors and ids differ in length")
    if local is not None and len(local) != n:
        raise ValueError("local features and ids differ in length")
    str_dt = h5py.string_dtype()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=str_dt)
            if global_desc is not None:
                f.create_dataset("global", data=np.asarray(global_desc, np.float32))
            if local is not None:
                counts = np.array([len(lf) for lf in local], np.int64)
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                dim = next((lf.descriptors.shape[1] for lf in local if len(lf)), 128)
                g = f.create_group("local")
                g.create_dataset("offsets", data=offsets)

                def cat(attr, shape_tail, dtype):
                    parts = [np.asarray(getattr(lf, attr), dtype).reshape((-1,) + shape_tail) for lf in local]
                    return np.concatenate(parts) if parts else np.zeros((0,) + shape_tail, dtype)

                g.create_dataset("keypoints", data=cat("keypoints", (2,), np.float32))
                g.create_dataset("descriptors", data=cat("descriptors", (dim,), np.dtype(local_dtype)))
                g.create_dataset("scales", data=cat("scales", (), np.float32))
                g.create_dataset("scores", data=cat("scores", (), np.float32))
            fg = f.create_group("failures")
            fg.create_dataset("ids", data=np.array([a for a, _ in failures], dtype=object), dtype=str_dt)
            fg.create_dataset("reasons", data=np.array([b for _, b in failures], dtype=object), dtype=str_dt)
            f.attrs["has_local"] = local is not None
            f.attrs["has_global"] = global_desc is not None
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
    return path


def read_attrs(path: str | Path) -> dict | None:
    """Attributes of a complete shard, or None when the file is missing or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except (OSError, KeyError):
        return None


def _decode(arr) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in arr]


class FeatureStore:
    """Read access to all shards of one split directory (e.g. WORK_DIR/features/train)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise LandmarksError(f"no features in {self.directory}: run `make features` first")
        self.reload()

    def reload(self) -> None:
        import h5py

        self.files = sorted(self.directory.glob(SHARD_GLOB)) + sorted(self.directory.glob(CACHE_GLOB))
        self._global_rows: dict[str, tuple[int, int]] = {}
        self._local_rows: dict[str, tuple[int, int]] = {}
        self._failures: dict[str, str] = {}
        self._order: list[str] = []
        self._handles: dict[int, object] = {}
        for fi, p in enumerate(self.files):
            with h5py.File(p, "r") as f:
                ids = _decode(f["ids"][:])
                has_global = "global" in f
                for row, i in enumerate(ids):
                    if has_global and i not in self._global_rows:
                        self._global_rows[i] = (fi, row)
                        self._order.append(i)
                    if "local" in f and i not in self._local_rows:
                        self._local_rows[i] = (fi, row)
                for i, r in zip(_decode(f["failures/ids"][:]), _decode(f["failures/reasons"][:])):
                    if i not in self._global_rows:
                        self._failures.setdefault(i, r)
        for i in self._global_rows:
            self._failures.pop(i, None)

    # -- global -----------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        """Ids with a global descriptor, in shard order."""
        return list(self._order)

    def failures(self) -> dict[str, str]:
        """id -> reason for images that produced no features."""
        return dict(self._failures)

    def global_matrix(self, dtype=np.float32) -> tuple[list[str], np.ndarray]:
        """All global descriptors as one [n, D] array (shard order) with their ids."""
        import h5py

        ids, blocks = [], []
        for p in self.files:
            if p.name.startswith("local-cache"):
                continue
            with h5py.File(p, "r") as f:
                if "global" not in f:
                    continue
                ids.extend(_decode(f["ids"][:]))
                blocks.append(f["global"][:].astype(dtype, copy=False))
        if not blocks:
            return [], np.zeros((0, 0), dtype)
        return ids, np.concatenate(blocks)

    # -- local ------------------------------------------------------------------------
    def has_local(self, image_id: str) -> bool:
        return image_id in self._local_rows

    def local_ids(self) -> set[str]:
        return set(self._local_rows)

    def _handle(self, fi: int):
        import h5py

        h = self._handles.get(fi)
        if h is None:
            h = self._handles[fi] = h5py.File(self.files[fi], "r")
        return h

    def local(self, ids: Iterable[str]) -> dict[str, LocalFeatures]:
        """Local features of the given ids that have them (missing ids are left out)."""
        out = {}
        for i in ids:
            loc = self._local_rows.get(i)
            if loc is None:
                continue
            fi, row = loc
            g = self._handle(fi)["local"]
            a, b = g["offsets"][row : row + 2]
            out[i] = LocalFeatures(
                g["keypoints"][a:b].astype(np.float32),
                g["descriptors"][a:b].astype(np.float32),
                g["scales"][a:b].astype(np.float32),
                g["scores"][a:b].astype(np.float32),
            )
        return out

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
