"""Helpers every bench row shares: medians, peak memory, the machine, formatting, child processes."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import threading
from pathlib import Path

import numpy as np

from landmarks.delg.delg_io import META_FILE
from landmarks.utils import available_cores

REPO = Path(__file__).resolve().parents[3]


def median(xs) -> float:
    """Median of the timed repeats (NaN when there are none)."""
    return float(statistics.median(xs)) if xs else float("nan")


def cores() -> int:
    """CPU cores this process may use (its affinity mask, not the host's count)."""

    return available_cores()


def rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_own() -> int:
    """Peak resident memory of this process's own address space (``VmHWM``).  ``ru_maxrss`` is
    kept over fork + exec, so a spawned child reports its parent's high-water mark when that was
    higher; ``VmHWM`` starts afresh with the exec'd image."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Peak resident memory above the level at entry, sampled every `period` seconds."""

    def __init__(self, period: float = 0.01):
        self.period = period
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def gb(b) -> str:
    """Bytes as '1.23 GB' (or MB below 0.1 GB)."""
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def fmt(x, nd=2) -> str:
    """A number for a table cell; 'n/a' for None and non-finite values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def in_child(fn, *args):
    """Run fn(*args) in a fresh spawned process (clean peak-memory numbers); return its result."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_call_and_release, fn, *args).result()


def _call_and_release(fn, *args):
    """fn(*args), then stop the child's idle joblib (loky) workers: left alone they hold the child's
    exit, and the bench with it, for loky's idle timeout (5 min)."""
    try:
        return fn(*args)
    finally:
        from joblib.externals.loky import reusable_executor

        if reusable_executor._executor is not None:
            reusable_executor._executor.shutdown(wait=True)


# ---------------------------------------------------------------------------------- machine
def cpu_info() -> dict:
    """CPU model, cores, SIMD flags and clock (GHz) from /proc/cpuinfo."""
    model, mhz, flags = platform.processor() or "unknown", 0.0, set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "model name" and model in ("unknown", "", platform.processor()):
                model = v
            elif k == "cpu MHz" and not mhz:
                mhz = float(v)
            elif k == "flags" and not flags:
                flags = set(v.split())
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover
        mem = 0
    return {"model": model, "cores": cores(), "mhz": mhz, "simd": simd, "ram": mem}


def versions() -> dict:
    """Versions of the libraries whose speed the rows measure."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in (
        "numpy",
        "pandas",
        "tensorflow-cpu",
        "tensorflow",
        "keras",
        "faiss-cpu",
        "pydegensac",
        "scipy",
        "h5py",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def peak_gflops(cfg, info: dict) -> tuple[float, str]:
    """Peak FP32 GFLOP/s = cores x GHz x FLOP/cycle, with the assumption spelled out."""
    bc = cfg.bench
    ghz = bc.cpu_ghz or (info["mhz"] / 1000.0)
    if ghz <= 0:
        ghz = 2.0
        src = "assumed 2.0 GHz (no clock in /proc/cpuinfo)"
    else:
        src = "bench.cpu_ghz" if bc.cpu_ghz else "/proc/cpuinfo 'cpu MHz' (nominal; turbo not counted)"
    peak = info["cores"] * ghz * bc.flops_per_cycle
    return peak, (
        f"{info['cores']} cores x {ghz:.2f} GHz ({src}) x {bc.flops_per_cycle} FLOP/cycle "
        "(AVX2: 2 FMA units x 8 fp32 x 2; AVX-512 on Zen 4 is double-pumped, same rate)"
    )


# ---------------------------------------------------------------------------------- inputs
def model_meta(model_dir) -> dict | None:
    """The project's landmarks_model.json of a SavedModel (None for a foreign model)."""

    p = Path(model_dir) / META_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def model_dim(cfg, model_dir) -> int:
    """Global descriptor size of the model (its metadata, else the config)."""
    meta = model_meta(model_dir)
    return int(meta["global_dim"]) if meta and meta.get("global_dim") else int(cfg.model.global_dim)


def shared_dir(cfg) -> Path:
    """The shared real photo sets (bench.shared_data, else ../shared/data next to the repo)."""
    return Path(cfg.bench.shared_data) if cfg.bench.shared_data else REPO.parent / "shared" / "data"


def storage(path) -> dict:
    """Bytes on disk of each dataset in an HDF5 shard, plus the file size."""
    import h5py

    out = {"file": Path(path).stat().st_size}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj.id.get_storage_size()

        f.visititems(visit)
        out["n"] = int(f["ids"].shape[0])
        out["m"] = int(f["local/descriptors"].shape[0]) if "local" in f else 0
    return out


def realistic_descriptors(real: np.ndarray, n: int, seed: int, noise: float, chunk: int = 65536) -> np.ndarray:
    """n unit vectors with the structure of real descriptors: a random real descriptor plus noise
    drawn from the real set's own principal components and variances (x noise), so copies of
    different photos overlap as views of real landmarks do, in the real set's low-dimensional span."""
    rng = np.random.default_rng(seed)
    real = np.asarray(real, np.float32)
    _, sv, vt = np.linalg.svd(real - real.mean(0), full_matrices=False)
    std = (sv / math.sqrt(len(real))).astype(np.float32) * np.float32(noise)
    iso = np.float32(0.05 * noise * float(std.mean()))  # a little full-rank noise on top
    out = np.empty((n, real.shape[1]), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = real[rng.integers(0, len(real), b - a)] + (rng.standard_normal((b - a, len(std)), np.float32) * std) @ vt
        x += rng.standard_normal(x.shape, np.float32) * iso
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out
