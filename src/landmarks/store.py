"""Feature shards on disk (HDF5) and the reader every later stage uses.

One shard file per extraction task, written atomically (temp name, then rename):

    ids                     str  [n]        image ids with features, in shard order
    order                   i64  [n]        each id's row in the split's CSV (id-hash shards)
    keys                    str  [n]        each image's file key (reuse by key: landmarks.utils.cache.file_keys)
    global                  f32  [n, D]     L2-normalised global descriptors
    local/offsets           i64  [n + 1]    row range of image i in the arrays below
    local/keypoints         f32  [m, 2]     (x, y) box centres in original-image pixels
    local/descriptors       f16  [m, d]     L2-normalised local descriptors
    local/scales            f32  [m]        image scale each feature came from
    local/scores            f32  [m]        attention (keypoint) score
    failures/ids, failures/reasons  str     images that produced no features, and why
    failures/keys           str             their file keys (id-hash shards)
    attrs: fingerprint, global_fingerprint, local_fingerprint, split, shard, num_shards, has_local, ...

Local features of shortlisted train images (stage ``landmarks local-features``) are cached in
the same format as ``local-cache-*.h5`` next to the shards, with their file keys too.
``store-index.npz`` beside them persists the id -> (file, row) index, keyed by the files' names,
sizes and mtimes (``load_index``); a damaged one is rebuilt.  ``save_npz``/``load_npz``: the stamped
npz outputs of later stages (``landmarks.utils.cache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from landmarks.utils import LandmarksError, atomic_path
from landmarks.utils.cache import FORMATS, files_fingerprint, load_npz, load_stamped, save_npz

__all__ = ["load_npz", "save_npz"]  # re-exported: the stamped stage outputs (landmarks.utils.cache)

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


@dataclass
class FeatureMaps:
    """One image's NBB maps, deep layer first, and where their cells lie in the original image."""

    maps: list  # [h_l, w_l, c_l] float16/float32 per layer
    strides: np.ndarray  # [L] cell spacing in resized-image pixels
    offsets: np.ndarray  # [L] centre of cell 0 in resized-image pixels
    scale: float  # resized pixels per original pixel
    shape: tuple  # (rows, columns) of the original image

    def flat(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(cells [h*w, c] float32, NBB activation [h*w]: each cell's L2 norm scaled to [0, 1] over
        the map), computed once per level: an image is matched against many others."""
        cache = self.__dict__.setdefault("_flat", {})
        if level not in cache:
            m = self.maps[level]
            f = np.asarray(m, np.float32).reshape(-1, m.shape[-1])
            h = np.linalg.norm(f, axis=1)
            lo, hi = float(h.min()), float(h.max())
            cache[level] = (f, (h - lo) / max(hi - lo, 1e-9))
        return cache[level]

    def centres(self, level: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(x, y) in original-image pixels of cells (rows, cols) of `level`."""
        s, o = float(self.strides[level]), float(self.offsets[level])
        xy = np.stack([cols * s + o, rows * s + o], axis=1).astype(np.float64)
        return xy / float(self.scale)

    def extent(self) -> np.ndarray:
        """Corners (0, 0) and (w - 1, h - 1) of the original image."""
        return np.array([[0.0, 0.0], [self.shape[1] - 1.0, self.shape[0] - 1.0]])


def write_maps(path: str | Path, records: dict, keys: dict | None = None) -> Path:
    """Write one batch of NBB feature maps atomically: id -> FeatureMaps, or a failure reason (str).

    Layout: one group per id with datasets l0, l1, ... (float16 [h, w, c], deep first) and attrs
    strides, offsets, scale, shape, key (the image's file key, "" when unknown) or failure."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for image_id, r in records.items():
            g = f.create_group(image_id)
            g.attrs["key"] = (keys or {}).get(image_id, "")
            if isinstance(r, str):
                g.attrs["failure"] = r
                continue
            for i, m in enumerate(r.maps):
                g.create_dataset(f"l{i}", data=np.asarray(m, np.float16))
            g.attrs["strides"] = np.asarray(r.strides, np.float64)
            g.attrs["offsets"] = np.asarray(r.offsets, np.float64)
            g.attrs["scale"] = float(r.scale)
            g.attrs["shape"] = np.asarray(r.shape[:2], np.int64)
    return Path(path)


def maps_keys(path: str | Path) -> dict[str, str]:
    """id -> file key of every record (failures included) of a maps file ({} when unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {i: str(g.attrs.get("key", "")) for i, g in f.items()}
    except OSError:  # unreadable (a killed writer leaves none: files are renamed when complete)
        return {}


def drop_maps(path: str | Path, ids: set[str]) -> None:
    """Rewrite a maps file without the records of `ids` (atomically; removed when none is left)."""
    keys = maps_keys(path)
    keep = set(keys) - set(ids)
    if len(keep) == len(keys):
        return
    if not keep:
        Path(path).unlink(missing_ok=True)
        return
    write_maps(path, read_maps([path], keep), {i: keys[i] for i in keep})


def read_maps(paths: Iterable[str | Path], wanted: set[str]) -> dict:
    """id -> FeatureMaps (float16 maps) or failure reason (str) of the `wanted` ids in the files
    (an id has one record: ``drop_maps`` removes a replaced image's old one)."""
    import h5py

    out: dict = {}
    for p in paths:
        with h5py.File(p, "r") as f:
            for image_id in wanted & set(f.keys()):
                g = f[image_id]
                if "failure" in g.attrs:
                    out[image_id] = str(g.attrs["failure"])
                    continue
                n = len(g.attrs["strides"])
                out[image_id] = FeatureMaps(
                    [g[f"l{i}"][()] for i in range(n)],
                    np.asarray(g.attrs["strides"], np.float64),
                    np.asarray(g.attrs["offsets"], np.float64),
                    float(g.attrs["scale"]),
                    tuple(int(x) for x in g.attrs["shape"]),
                )
    return out


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
    order: Sequence[int] | None = None,
    keys: Sequence[str] | None = None,
    failure_keys: Sequence[str] | None = None,
) -> Path:
    """Write one shard atomically. `local` is None for global-only shards.

    `order`: each id's row in the split's CSV (readers sort by it); `keys`/`failure_keys`: each
    id's file key (id, size, mtime) so a later run can keep the row instead of extracting again."""
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
            if order is not None:
                f.create_dataset("order", data=np.asarray(order, np.int64).reshape(n))
            if keys is not None:
                f.create_dataset("keys", data=np.array(list(keys), dtype=object), dtype=str_dt)
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
            if failure_keys is not None:
                fg.create_dataset("keys", data=np.array(list(failure_keys), dtype=object), dtype=str_dt)
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


def decode_ids(arr) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in arr]


def read_keys(path: str | Path) -> dict[str, str] | None:
    """id -> file key of every row and failure of a shard or local cache (None when the file holds
    no keys or cannot be read)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "keys" not in f or "keys" not in f["failures"]:
                return None
            out = dict(zip(decode_ids(f["failures/ids"][:]), decode_ids(f["failures/keys"][:])))
            out.update(zip(decode_ids(f["ids"][:]), decode_ids(f["keys"][:])))
            return out
    except (OSError, KeyError):
        return None


def drop_rows(path: str | Path, ids: set[str]) -> None:
    """Rewrite a shard or local cache without the rows and failures of `ids` (atomically; removed
    when nothing is left).  Its shard fingerprint is cleared: the file is never taken as done."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        all_ids = decode_ids(f["ids"][:])
        keep = [r for r, i in enumerate(all_ids) if i not in ids]
        f_ids, f_reasons = decode_ids(f["failures/ids"][:]), decode_ids(f["failures/reasons"][:])
        f_keys = decode_ids(f["failures/keys"][:]) if "keys" in f["failures"] else None
        f_keep = [r for r, i in enumerate(f_ids) if i not in ids]
        glob = f["global"][:][keep] if "global" in f else None
        local = None
        if "local" in f:
            g = f["local"]
            offs = g["offsets"][:]
            arrays = {k: g[k][:] for k in ("keypoints", "descriptors", "scales", "scores")}
            local = [LocalFeatures(*(arrays[k][offs[r] : offs[r + 1]] for k in arrays)) for r in keep]
            dtype = str(arrays["descriptors"].dtype)
        extra = {k: [f[k][:][r] for r in keep] for k in ("order", "keys") if k in f}
        attrs = {**dict(f.attrs), "fingerprint": ""}
    if not keep and not f_keep:
        path.unlink(missing_ok=True)
        return
    if "keys" in extra:
        extra["keys"] = decode_ids(extra["keys"])
    write_shard(
        path,
        [all_ids[r] for r in keep],
        glob,
        local,
        [(f_ids[r], f_reasons[r]) for r in f_keep],
        {k: v for k, v in attrs.items() if k not in ("has_local", "has_global")},
        local_dtype=dtype if local is not None else "float16",
        failure_keys=[f_keys[r] for r in f_keep] if f_keys is not None else None,
        **extra,
    )


INDEX_NAME = "store-index.npz"


def _store_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(SHARD_GLOB)) + sorted(directory.glob(CACHE_GLOB))


@dataclass
class StoreIndex:
    """id -> (file, row) of one split directory, built by one scan of the shards' ids.

    Global rows are in stored order: the CSV position (``order`` dataset) when every shard has one,
    else shard order.  Ids are kept as numpy byte arrays; dicts are built lazily, so a worker that
    only reads local features never pays for the 1.58 M global ids.
    """

    digest: str
    files: list  # file names, in index order
    g_ids: np.ndarray  # S  [n]
    g_loc: np.ndarray  # i64 [n, 2] (file, row)
    l_ids: np.ndarray  # S  [m]
    l_loc: np.ndarray  # i64 [m, 2]
    f_ids: np.ndarray  # S  [k] failures without a global row
    f_reasons: np.ndarray  # S [k]
    local_only: bool = False  # loaded without the global ids and failures

    @staticmethod
    def build(directory: Path, files: Sequence[Path], digest: str) -> "StoreIndex":
        import h5py

        g_ids, g_loc, g_ord, l_ids, l_loc, fails = [], [], [], [], [], {}
        seen_g, seen_l = set(), set()
        have_order = True
        for fi, p in enumerate(files):
            with h5py.File(p, "r") as f:
                raw = f["ids"][:]
                ids = decode_ids(raw)
                is_cache = p.name.startswith("local-cache")
                order = f["order"][:] if ("order" in f and not is_cache) else None
                if "global" in f:
                    for row, i in enumerate(ids):
                        if i not in seen_g:
                            seen_g.add(i)
                            g_ids.append(i)
                            g_loc.append((fi, row))
                            if order is not None:
                                g_ord.append(int(order[row]))
                            elif not is_cache:
                                have_order = False
                            else:
                                g_ord.append(np.iinfo(np.int64).max)  # cache-only ids go last
                if "local" in f:
                    for row, i in enumerate(ids):
                        if i not in seen_l:
                            seen_l.add(i)
                            l_ids.append(i)
                            l_loc.append((fi, row))
                for i, r in zip(decode_ids(f["failures/ids"][:]), decode_ids(f["failures/reasons"][:])):
                    fails.setdefault(i, r)
        g_loc_a = np.asarray(g_loc, np.int64).reshape(-1, 2)
        g_ids_a = _encode(g_ids)
        if have_order and g_ord:
            perm = np.argsort(np.asarray(g_ord, np.int64), kind="stable")
            g_ids_a, g_loc_a = g_ids_a[perm], g_loc_a[perm]
        fails = {i: r for i, r in fails.items() if i not in seen_g}
        return StoreIndex(
            digest,
            [p.name for p in files],
            g_ids_a,
            g_loc_a,
            _encode(l_ids),
            np.asarray(l_loc, np.int64).reshape(-1, 2),
            _encode(list(fails)),
            _encode(list(fails.values())),
        )

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    digest=np.array(self.digest),
                    files=np.array(self.files, dtype=str),
                    g_ids=self.g_ids,
                    g_loc=self.g_loc,
                    l_ids=self.l_ids,
                    l_loc=self.l_loc,
                    f_ids=self.f_ids,
                    f_reasons=self.f_reasons,
                )

    @staticmethod
    def load(path: Path, digest: str, local_only: bool = False) -> "StoreIndex | None":
        """The persisted index when it matches `digest`, else None.  `local_only`: skip the global
        ids and failures (1.58 M entries) for readers that only want local features."""

        def read(z):  # an npz reads only the members asked for
            if str(z["digest"]) != digest:
                return None
            if local_only:
                none, loc = np.zeros((0,), "S1"), np.zeros((0, 2), np.int64)
                g_ids, g_loc, f_ids, f_reasons = none, loc, none, none
            else:
                g_ids, g_loc, f_ids, f_reasons = z["g_ids"], z["g_loc"], z["f_ids"], z["f_reasons"]
            files = [str(x) for x in z["files"]]
            return StoreIndex(digest, files, g_ids, g_loc, z["l_ids"], z["l_loc"], f_ids, f_reasons, local_only)

        return load_stamped(path, read)  # damaged: logged in one line, None (rebuilt)


def _encode(ids: Sequence[str]) -> np.ndarray:
    return np.array([i.encode() for i in ids], dtype="S") if len(ids) else np.zeros((0,), "S1")


def load_index(directory: str | Path, persist: bool = True, local_only: bool = False) -> StoreIndex:
    """The split directory's id index: read from ``store-index.npz`` when its digest matches the
    shards' names, sizes and mtimes, else built by one scan and saved there (atomically).
    `local_only`: a persisted index is read without its global part (see ``StoreIndex.load``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LandmarksError(f"no features in {directory}: run `make features` first")
    files = _store_files(directory)
    digest = files_fingerprint(files, salt=f"index-v{FORMATS['index']}\n")
    path = directory / INDEX_NAME
    idx = StoreIndex.load(path, digest, local_only)
    if idx is None:
        idx = StoreIndex.build(directory, files, digest)
        if persist:
            try:
                idx.save(path)
            except OSError:  # a read-only feature directory still works, it just rebuilds
                pass
    return idx


def _check_finite(path: Path, block: np.ndarray) -> None:
    """A damaged byte range decodes to NaN/inf: name the shard here, not in a later knn error."""
    bad = int(np.count_nonzero(~np.isfinite(block).all(axis=1)))
    if bad:
        raise LandmarksError(
            f"{path}: {bad} global descriptor row(s) hold NaN or inf (a damaged shard): "
            "delete it and rerun `landmarks features` (make features)"
        )


class FeatureStore:
    """Read access to all shards of one split directory (e.g. WORK_DIR/features/train).

    `index`: a StoreIndex already built for this directory (verification builds it once per
    stage and hands it to its workers); default: ``load_index`` (persisted, rebuilt when stale).
    """

    def __init__(self, directory: str | Path, index: StoreIndex | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise LandmarksError(f"no features in {self.directory}: run `make features` first")
        self._handles: dict[int, object] = {}
        self._use(index if index is not None else load_index(self.directory))

    def reload(self) -> None:
        self.close()
        self._use(load_index(self.directory))

    def _use(self, index: StoreIndex) -> None:
        self.index = index
        self.files = [self.directory / n for n in index.files]
        self._local_rows: dict[str, tuple[int, int]] = {
            i.decode(): (int(a), int(b)) for i, (a, b) in zip(index.l_ids.tolist(), index.l_loc.tolist())
        }
        self._order_cache: list[str] | None = None

    def _full(self) -> None:
        if self.index.local_only:
            raise LandmarksError(f"{self.directory}: store opened for local features only")

    @property
    def _order(self) -> list[str]:
        self._full()
        if self._order_cache is None:
            self._order_cache = [i.decode() for i in self.index.g_ids.tolist()]
        return self._order_cache

    # -- global -----------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        """Ids with a global descriptor, in shard order."""
        return list(self._order)

    def failures(self) -> dict[str, str]:
        """id -> reason for images that produced no features."""
        self._full()
        return {i.decode(): r.decode() for i, r in zip(self.index.f_ids.tolist(), self.index.f_reasons.tolist())}

    def _global_layout(self) -> tuple[list[str], list[tuple[Path, np.ndarray]], int]:
        """Ids in CSV order (the shards' ``order`` rows; shard order for shards written without
        one), each shard with its rows' positions in that order, and the descriptor size."""
        import h5py

        ids, files, orders, dim = [], [], [], 0
        for p in self.files:
            if p.name.startswith("local-cache"):
                continue
            with h5py.File(p, "r") as f:
                if "global" not in f:
                    continue
                ids.extend(decode_ids(f["ids"][:]))
                files.append((p, int(f["global"].shape[0])))
                dim = dim or int(f["global"].shape[1])
                orders.append(f["order"][:] if "order" in f else None)
        pos = np.arange(len(ids))
        if orders and all(o is not None for o in orders):
            perm = np.argsort(np.concatenate(orders).astype(np.int64), kind="stable")
            if np.any(perm != np.arange(len(perm))):
                ids = [ids[k] for k in perm]
                pos = np.empty(len(perm), np.int64)
                pos[perm] = np.arange(len(perm))
        out, a = [], 0
        for p, m in files:
            out.append((p, pos[a : a + m]))
            a += m
        return ids, out, dim

    def global_shape(self) -> tuple[int, int]:
        """(rows, descriptor size) of global_matrix, without reading the descriptors."""
        ids, _, dim = self._global_layout()
        return len(ids), dim

    def global_matrix(self, dtype=np.float32, rows=None) -> tuple[list[str], np.ndarray]:
        """All global descriptors of the shards as one [n, D] array with their ids, in CSV order
        (the shards' ``order`` rows; shard order for shards written without one).  `rows`: only
        these positions of that order (sorted, unique), read shard by shard: a sample of a big
        split without the whole matrix in memory."""
        import h5py

        ids, files, dim = self._global_layout()
        if not files:
            return [], np.zeros((0, 0), dtype)
        if rows is not None:
            rows = np.asarray(rows, np.int64)
            ids = [ids[i] for i in rows]
        mat = np.empty((len(ids), dim), dtype)
        for p, pos in files:
            keep = None if rows is None else np.isin(pos, rows)
            if keep is not None and not keep.any():
                continue
            with h5py.File(p, "r") as f:
                block = f["global"][:].astype(dtype, copy=False)
            if keep is not None:
                block, pos = block[keep], np.searchsorted(rows, pos[keep])
            _check_finite(p, block)
            mat[pos] = block
        return ids, mat

    def write_global_matrix(self, path: str | Path, transform=None) -> list[str]:
        """global_matrix written to a raw float32 file [n, D'] one shard at a time (rows through
        `transform`, e.g. whitening), for matrices too big to hold twice; returns the ids."""
        import h5py

        ids, files, _ = self._global_layout()
        path = Path(path)
        d_out = None
        with atomic_path(path) as tmp:
            Path(tmp).touch()
            for p, pos in files:
                with h5py.File(p, "r") as f:
                    x = f["global"][:].astype(np.float32, copy=False)
                _check_finite(p, x)
                x = x if transform is None else np.asarray(transform(x), np.float32)
                if d_out is None:
                    d_out = x.shape[1]
                    with open(tmp, "r+b") as fh:
                        fh.truncate(len(ids) * d_out * 4)
                out = np.memmap(tmp, np.float32, "r+", shape=(len(ids), d_out))
                out[pos] = x
                out.flush()
                del out  # unmapped: written pages leave this process's RSS
        return ids

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


# -- per-scale probe files (the hard protocol) ------------------------------------------------------
# One HDF5 group per image id, written atomically per batch file:
#     <id>/global        f32 [S, D]   the global descriptor of every probe scale, unpooled
#     <id>/keypoints     f32 [m, 2]   (x, y) in resized-image pixels (mapped back when read for a setting)
#     <id>/descriptors   f16 [m, d]   local descriptors, the best `probe_features` of each scale
#     <id>/scales, scores f32 [m]
#     attrs: shape (resized image), scale (resize factor) | failure (why the image gave nothing)


@dataclass
class ProbeRecord:
    """Everything one image gives at every probe scale (or why it gave nothing)."""

    per_scale: np.ndarray | None  # [S, D]
    local: LocalFeatures | None  # in resized-image pixels
    shape: tuple[int, int] | None  # resized image (rows, columns)
    scale: float  # resize factor of the original image
    failure: str = ""


def write_probe(path: str | Path, records: dict[str, ProbeRecord]) -> Path:
    """Write one probe batch file atomically (a killed writer leaves no file)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for image_id, r in records.items():
            g = f.create_group(image_id)
            if r.failure:
                g.attrs["failure"] = r.failure
                continue
            g.create_dataset("global", data=np.asarray(r.per_scale, np.float32))
            g.create_dataset("keypoints", data=r.local.keypoints)
            g.create_dataset("descriptors", data=r.local.descriptors.astype(np.float16))
            g.create_dataset("scales", data=r.local.scales)
            g.create_dataset("scores", data=r.local.scores)
            g.attrs["shape"] = np.asarray(r.shape[:2], np.int64)
            g.attrs["scale"] = float(r.scale)
    return Path(path)


def probe_ids(path: str | Path) -> list[str]:
    """Image ids a probe file holds ([] when it cannot be read)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return list(f.keys())
    except OSError:  # unreadable (a killed writer leaves none: files are renamed when complete)
        return []


def read_probe(path: str | Path, wanted: set[str] | None = None) -> dict[str, ProbeRecord]:
    """The records of one probe file (only `wanted` ids when given); descriptors as float32."""
    import h5py

    out: dict[str, ProbeRecord] = {}
    with h5py.File(path, "r") as f:
        for image_id, grp in f.items():
            if wanted is not None and image_id not in wanted:
                continue
            if "failure" in grp.attrs:
                out[image_id] = ProbeRecord(None, None, None, 0.0, str(grp.attrs["failure"]))
                continue
            lf = LocalFeatures(
                grp["keypoints"][()], grp["descriptors"][()].astype(np.float32), grp["scales"][()], grp["scores"][()]
            )
            out[image_id] = ProbeRecord(grp["global"][()], lf, tuple(grp.attrs["shape"]), float(grp.attrs["scale"]))
    return out
