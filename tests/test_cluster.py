"""A real Dask cluster on 127.0.0.1: `dask scheduler` + two `dask worker` processes, started the
way users start them (`make cluster-check` runs this file).  Shards must be byte-identical to a
local run; a worker killed mid-run loses nothing: its shard is rerun on the other worker, the
result is identical and the driver's log says what happened.  Every process is stopped at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from landmarks.config import Config
from landmarks.features import features_dir, run_features

HOST = "127.0.0.1"  # never any other address
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Cluster:
    """dask scheduler + workers as subprocesses (own process groups), all on 127.0.0.1."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.logs = tmp, {}, {}
        self.port = _free_port()
        self.address = f"tcp://{HOST}:{self.port}"
        src = str(Path(__file__).resolve().parents[1] / "src")
        self.env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            TF_CPP_MIN_LOG_LEVEL="2",
            OMP_NUM_THREADS="1",
        )

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        self.logs[name] = self.tmp / f"{name}.log"
        self.procs[name] = subprocess.Popen(
            [str(BIN / "dask"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.tmp,
            start_new_session=True,
        )
        log.close()

    def start(self, workers: int = 2, timeout: float = 60.0) -> "Cluster":
        from dask.distributed import Client

        self._start("scheduler", ["scheduler", "--host", HOST, "--port", str(self.port), "--no-dashboard", "--no-show"])
        for k in range(workers):
            self._start(
                f"worker{k}",
                [
                    "worker",
                    self.address,
                    "--host",
                    HOST,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--no-nanny",
                    "--name",
                    f"w{k}",
                    "--local-directory",
                    str(self.tmp / f"w{k}"),
                ],
            )
        t0 = time.time()
        while True:
            try:
                with Client(self.address, timeout="5s") as c:
                    c.wait_for_workers(workers, timeout=max(1.0, timeout - (time.time() - t0)))
                    return self
            except OSError:
                if time.time() - t0 > timeout:
                    raise
                time.sleep(0.5)

    def worker_address(self, client, name: str) -> str:
        return next(a for a, w in client.scheduler_info()["workers"].items() if w.get("name") == name)

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for name, p in reversed(list(self.procs.items())):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait(5)
                    except ProcessLookupError:
                        pass


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c.start()
    finally:
        c.stop()
    assert all(p.poll() is not None for p in c.procs.values())  # nothing left running


@pytest.fixture
def data(tmp_path, fake_model, write_split):
    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    # enough images that a shard takes seconds even on an idle machine (the fake model does ~150
    # images/s): the worker must still be busy when the test kills it
    ids = write_split(root, "train", 1200, rng)
    pd.DataFrame({"id": ids, "landmark_id": np.arange(len(ids)) % 4}).to_csv(root / "train.csv", index=False)
    return root, fake_model


def _bytes(paths):
    return {Path(p).name: Path(p).read_bytes() for p in paths}


def test_real_cluster_identical_shards_and_worker_killed_mid_run(cluster, data, tmp_path, small_cfg):
    from dask.distributed import Client

    root, model = data
    local = run_features(
        small_cfg("extract.train_local=true"), root, tmp_path / "local", model, "train", shards=4, jobs=1
    )
    ref = _bytes(local)

    # 1. the cluster's shards are byte-identical to the local run's
    out = run_features(
        small_cfg("extract.train_local=true"),
        root,
        tmp_path / "dask1",
        model,
        "train",
        shards=4,
        scheduler=cluster.address,
    )
    assert _bytes(out) == ref

    # 2. a worker killed while it runs a shard: the driver (a CLI process, as users run it) still ends
    # with every shard, byte-identical, and its log names the lost worker and its shards
    work = tmp_path / "dask2"
    driver = subprocess.Popen(
        [
            str(BIN / "landmarks"),
            "features",
            "--data-dir",
            str(root),
            "--work-dir",
            str(work),
            "--model",
            str(model),
            "--split",
            "train",
            "--shards",
            "4",
            "--scheduler",
            cluster.address,
            "--set",
            "extract.max_image_size=64",
            "--set",
            "extract.max_feature_num=50",
            "--set",
            "extract.intra_op_threads=1",
            "--set",
            "extract.train_local=true",
            "-v",  # the per-shard log lines (which worker ran what) on the console, not only in logs/run.log
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster.env,
        start_new_session=True,
    )
    try:
        with Client(cluster.address, timeout="10s") as c:
            victim = cluster.worker_address(c, "w0")
            t0 = time.time()
            while not c.processing().get(victim):  # wait until w0 holds a shard task
                assert driver.poll() is None and time.time() - t0 < 120, "w0 never got a task"
                time.sleep(0.05)
            time.sleep(0.6)  # the driver's watch (every 0.25 s) sees it too; a shard takes seconds
            cluster.kill("worker0")
        text, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 0, text[-2000:]
    assert f"dask worker {victim} left while holding shard-" in text, text[-3000:]
    assert _bytes(sorted(features_dir(work, "train").glob("shard-*.h5"))) == ref
    lost = [ln for ln in text.splitlines() if "left while holding" in ln][0]
    lost_shards = re.findall(r"shard-\d+-of-\d+\.h5", lost)
    done_on = dict(re.findall(r"(shard-\d+-of-\d+\.h5) done on (\S+)", text))
    assert sorted(done_on) == sorted(ref) and lost_shards
    assert all(done_on[s] != victim for s in lost_shards)  # retried on the other worker


def test_verify_on_the_cluster_matches_local_and_survives_a_killed_worker(cluster, tmp_path):
    """`landmarks verify --scheduler` runs the test batches as cluster tasks: inliers identical
    to a local run, also when a worker is killed while it holds batches."""
    import threading

    from dask.distributed import Client

    from landmarks import verify
    from landmarks.store import load_npz
    from landmarks.tools.bench.verification import verify_set

    d = tmp_path / "vset"
    verify_set(d, n=400, n_test=96, R=8, cap=200, n_feat=300)  # random features: RANSAC runs every iteration
    cfg = Config()
    cfg.verify.num_to_rerank = 8
    args = (d / "knn.npz", d / "features" / "test", d / "features" / "train")
    cfg.verify.jobs = 1
    ref = load_npz(verify.run_verify(cfg, *args, tmp_path / "local.npz"))["inliers"]
    assert ref.shape == (96, 8) and ref.any()

    out1 = verify.run_verify(cfg, *args, tmp_path / "dask1.npz", scheduler=cluster.address)
    np.testing.assert_array_equal(load_npz(out1)["inliers"], ref)

    box = {}
    driver = threading.Thread(
        target=lambda: box.update(out=verify.run_verify(cfg, *args, tmp_path / "dask2.npz", scheduler=cluster.address)),
        daemon=True,  # a stuck driver fails this test, never the interpreter's exit
    )
    driver.start()
    with Client(cluster.address, timeout="10s") as c:
        victim = cluster.worker_address(c, "w0")
        t0 = time.time()
        while not c.processing().get(victim):  # wait until w0 holds batch tasks
            assert driver.is_alive() and time.time() - t0 < 120, "w0 never got a task"
            time.sleep(0.02)
        cluster.kill("worker0")
    driver.join(300)
    if driver.is_alive():  # say where it waits, and what the cluster said
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)
        logs = "\n".join(f"--- {n}\n{p.read_text()[-2000:]}" for n, p in cluster.logs.items())
        pytest.fail(f"verify on the cluster did not end within 300 s of the kill\n{logs}")
    assert "out" in box
    np.testing.assert_array_equal(load_npz(box["out"])["inliers"], ref)


def _square(x):
    return x * x


def test_run_on_dask_resubmits_a_task_whose_result_cannot_be_fetched(monkeypatch, caplog):
    """A finished task whose result does not arrive in time (its worker died while sending it) is
    submitted again and its result still comes back once, with a warning that names it."""
    import logging

    from dask.distributed import Client, Future, LocalCluster

    from landmarks import shards

    real_result, stuck = Future.result, set()

    def result(self, timeout=None):
        if self.key not in stuck and len(stuck) < 2:  # the first two fetches hang
            stuck.add(self.key)
            raise TimeoutError
        return real_result(self, timeout=timeout)

    monkeypatch.setattr(Future, "result", result)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        with Client(lc) as client, caplog.at_level(logging.WARNING, logger="landmarks"):
            got = dict(shards.run_on_dask(client, _square, [(k,) for k in range(6)], [f"t{k}" for k in range(6)]))
    assert got == {k: k * k for k in range(6)} and len(stuck) == 2
    warned = [r.getMessage() for r in caplog.records if "submitted again" in r.getMessage()]
    assert len(warned) == 2 and all("task t" in w for w in warned)


def test_run_on_dask_stops_with_a_clear_error_when_a_result_never_arrives(monkeypatch):
    from dask.distributed import Client, Future, LocalCluster

    from landmarks import shards
    from landmarks.utils import LandmarksError

    def result(self, timeout=None):
        raise TimeoutError

    monkeypatch.setattr(Future, "result", result)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        with Client(lc) as client, pytest.raises(LandmarksError, match="could not be fetched in 3 tries"):
            list(shards.run_on_dask(client, _square, [(2,)], ["t0"]))
