"""The stage cache: what every cached output is keyed by, how it is named, stamped and checked.

One rule for every stage: an output is up to date when the fingerprint stamped in it equals
today's, and a fingerprint is a digest of

- a format version (``FORMATS``): bump it when a stage writes something different,
- the config sections the stage depends on (``SECTIONS``), without their runtime-only keys
  (``RUNTIME_ONLY``: jobs, chunk sizes ... change speed, never content),
- the fingerprints of its inputs (a feature directory's shards, another stage's stamp, a model).

Outputs whose settings may vary sit side by side, named by a short hash of those settings
(``output_name``: ``knn-<h>.npz``); the full fingerprint lives inside the file.  A damaged stamped
file (truncated, bad CRC, not a zip) counts as absent: one warning line, and the stage redoes it.

Rows are keyed finer than files: each image's row in a feature shard or local cache carries the
image's file key (``file_keys``: size, mtime in ns, inode and ctime; or a content hash with
``extract.file_key=content``), and a model has two fingerprints (``model_fingerprints``), one per
path: a global descriptor depends on the backbone and the global head only, local features on the
backbone and the local head.  Adapting the local head therefore keeps every global row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from landmarks.utils import LandmarksError, atomic_path

log = logging.getLogger(__name__)

# Bump a stage's version when what it writes changes; every cached output of it is then redone.
FORMATS = {
    "features": 3,  # shard rows keyed by global/local model fingerprints and ns file keys
    "index": 2,  # store-index.npz
    "whiten": 2,
    "knn": 3,
    "verify": 3,
    "calibrate": 1,
    "adapt": 1,
    "train": 1,
    "model": 2,  # the serving graph of our exports (export.save_serving) and batch-norm folding
}

# The config sections each settings-named stage depends on (its output name hashes them).
SECTIONS = {
    "whiten": ("whiten",),
    "knn": ("knn", "whiten"),
    "verify": ("knn", "whiten", "verify"),
    "calibrate": ("knn", "whiten", "verify", "calibrate"),
}

# Settings that change how fast a stage runs or where it runs, never what it writes.
RUNTIME_ONLY = {
    "knn": ("chunk_size",),
    "verify": ("jobs",),
    "extract": ("shards", "jobs", "scheduler", "intra_op_threads", "prefetch", "max_shard_images", "file_key"),
}

# The extraction settings each path of the model depends on (a global-only train shard does not
# change with the local ones).
GLOBAL_FIELDS = ("global_scales", "max_image_size", "max_image_pixels", "min_image_size")
LOCAL_FIELDS = (
    "local_scales",
    "max_feature_num",
    "abs_thres",
    "max_image_size",
    "max_image_pixels",
    "min_image_size",
    "local_dtype",
)
# Affine view synthesis (docs/view_synthesis.md): test images only, so these enter the local
# fingerprint of the test split alone, and only when views are on (off keeps today's fingerprints).
VIEW_FIELDS = ("view_tilts", "view_angles", "view_features")
VIEW_SPLITS = ("test",)
HASH_LEN = 10  # hex digits of the settings hash in output names
MODEL_META = "landmarks_model.json"  # our exports' settings and fingerprints, beside saved_model.pb


# -- digests ------------------------------------------------------------------------------------
def digest(*parts: str) -> str:
    """First 16 hex digits of the sha1 of the parts joined by newlines."""
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def settings(cfg, *sections: str, drop: dict | None = None) -> dict:
    """The named config sections as plain JSON-ready dicts, without their runtime-only keys (and
    without the keys in `drop`: section -> keys)."""
    d = cfg.to_dict()
    out = {}
    for s in sections:
        skip = set(RUNTIME_ONLY.get(s, ())) | set((drop or {}).get(s, ()))
        out[s] = {k: _plain(v) for k, v in d[s].items() if k not in skip}
    return out


def settings_hash(cfg, *sections: str) -> str:
    """Short stable hash of the named sections without runtime-only keys: output names."""
    return hashlib.sha1(json.dumps(settings(cfg, *sections), sort_keys=True).encode()).hexdigest()[:HASH_LEN]


def fingerprint(
    stage: str, cfg=None, inputs: Sequence[str] = (), sections: Sequence[str] | None = None, drop: dict | None = None
) -> str:
    """The fingerprint of one run of `stage`: its format version, its settings (``SECTIONS`` or
    `sections`, runtime keys and `drop` left out) and its inputs' fingerprints."""
    secs = tuple(SECTIONS.get(stage, ()) if sections is None else sections)
    conf = json.dumps(settings(cfg, *secs, drop=drop), sort_keys=True) if cfg is not None and secs else ""
    return digest(f"{stage}-v{FORMATS[stage]}", conf, *inputs)


def output_name(stage: str, cfg, prefix: str | None = None, suffix: str = ".npz") -> str:
    """`<prefix>-<settings hash>.npz`: variants of a stage's output sit side by side."""
    return f"{prefix or stage}-{settings_hash(cfg, *SECTIONS[stage])}{suffix}"


def files_fingerprint(files: Iterable[Path], salt: str = "") -> str:
    """Names, sizes and ns mtimes of files: an atomic rewrite of any of them changes it."""
    h = hashlib.sha1(salt.encode())
    for p in files:
        st = Path(p).stat()
        h.update(f"{Path(p).name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def dir_fingerprint(path: str | Path, pattern: str = "**/*") -> str:
    """Relative names, sizes and ns mtimes of the files under `path` matching `pattern`."""
    path = Path(path)
    h = hashlib.sha1()
    for p in sorted(path.glob(pattern)):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def array_fingerprint(arrays: Iterable, extra: dict | None = None) -> str:
    """Digest of numeric arrays (in order: dtype, shape, bytes) and of `extra` (JSON): the weights a
    model path uses, with the settings of the graph around them."""
    h = hashlib.sha1(json.dumps(extra or {}, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# -- image file keys ----------------------------------------------------------------------------
FILE_KEY_MODES = ("stat", "content")


def file_keys(ids: Sequence[str], paths: Sequence[str], mode: str = "stat") -> list[str]:
    """Each image's file key: its id with the file's size, ns mtime, inode and ns ctime (`stat`),
    or with a hash of its bytes (`content`, for file systems whose times cannot be trusted).
    Replacing an image's file, even with one of the same size and a restored mtime, changes it
    (ctime is set by the kernel); an unreadable file gets `id:-`."""
    if mode not in FILE_KEY_MODES:
        raise LandmarksError(f"extract.file_key must be one of {', '.join(FILE_KEY_MODES)} (got {mode!r})")
    out = []
    for i, p in zip(ids, paths):
        try:
            if mode == "content":
                out.append(f"{i}:c{content_digest(p)}")
            else:
                st = os.stat(p)
                out.append(f"{i}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}")
        except OSError:
            out.append(f"{i}:-")
    return out


def content_digest(path) -> str:
    """sha1 of a file's bytes (20 hex): for small inputs whose content, not mtime, matters."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


# -- model fingerprints -------------------------------------------------------------------------
def model_fingerprints(model_dir: str | Path) -> tuple[str, str]:
    """(global, local) fingerprints of a DELG SavedModel.  Our exports record the digest of the
    weights each path uses (``landmarks_model.json``: global_fingerprint, local_fingerprint), so an
    adapted model, whose backbone and global head are the default model's, shares its global one.
    Any other model (Google's exports, ours from before) is fingerprinted whole, by its files."""
    try:
        meta = json.loads((Path(model_dir) / MODEL_META).read_text())
    except (OSError, ValueError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    g, loc = meta.get("global_fingerprint"), meta.get("local_fingerprint")
    if g and loc:
        return str(g), str(loc)
    whole = dir_fingerprint(model_dir)
    return whole, whole


def local_fields(cfg, split: str = "") -> tuple[str, ...]:
    """The extraction settings a split's local features depend on: ``LOCAL_FIELDS``, plus
    ``VIEW_FIELDS`` for the test split when synthetic views are on (``extract.view_tilts``)."""
    views = split in VIEW_SPLITS and bool(cfg.extract.view_tilts)
    return LOCAL_FIELDS + (VIEW_FIELDS if views else ())


def feature_fingerprints(cfg, model_dir: str | Path, split: str = "") -> tuple[str, str]:
    """(global, local) fingerprints of stored feature rows of `split`: the model path's fingerprint
    and the extraction settings that path uses (``GLOBAL_FIELDS``, ``local_fields``)."""
    g_model, l_model = model_fingerprints(model_dir)
    e = cfg.extract
    g_set = json.dumps({k: _plain(getattr(e, k)) for k in GLOBAL_FIELDS}, sort_keys=True)
    l_set = json.dumps({k: _plain(getattr(e, k)) for k in local_fields(cfg, split)}, sort_keys=True)
    v = f"features-v{FORMATS['features']}"
    return digest(v, "global", g_model, g_set), digest(v, "local", l_model, l_set)


# -- stamped npz outputs ------------------------------------------------------------------------
DAMAGE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _damaged(path: Path, e: BaseException) -> None:
    log.warning("%s is damaged (%s): it is redone", path, " ".join(str(e).split())[:120] or type(e).__name__)


def save_npz(path: str | Path, fp: str, **arrays) -> Path:
    """Write a stage's npz output atomically, stamped with the fingerprint it was made from."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fp), **arrays)
    return path


def read_stamp(path: str | Path, check: bool = True) -> str | None:
    """The fingerprint stamped in a stage's npz output; None when the file is missing, holds no
    stamp or is damaged (`check`: every member's CRC is verified; damage is logged in one line)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if check:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"bad CRC in {bad}")
        with np.load(path, allow_pickle=False) as z:
            return str(z["fingerprint"])
    except DAMAGE as e:
        _damaged(path, e)
        return None


def up_to_date(path: str | Path, fp: str) -> bool:
    """True when `path` exists, is intact and is stamped with `fp`."""
    return read_stamp(path) == fp


def load_npz(path: str | Path, what: str = "") -> dict:
    """All arrays of a stage's npz output; a damaged file is one LandmarksError line."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except DAMAGE as e:
        raise LandmarksError(
            f"{path} is damaged or missing ({' '.join(str(e).split())[:120]}): rerun {what or 'the stage that writes it'}"
        ) from None


def load_stamped(path: str | Path, reader):
    """`reader(np.load(path))`, or None (one warning line) when the file is damaged: for caches
    that are rebuilt when unreadable (the store index)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return reader(z)
    except DAMAGE as e:
        _damaged(path, e)
        return None


# -- JSON stamps (dataset folders, models) --------------------------------------------------------
def stamp_matches(path: str | Path, key: str, value) -> bool:
    """True when the JSON stamp file `path` exists and records `value` under `key`: the output it
    describes was made with the same parameters, so a rerun can skip it."""
    try:
        return json.loads(Path(path).read_text()).get(key) == value
    except (OSError, ValueError, AttributeError):
        return False
