"""Extraction s/image of the test-side local features (features.run_model, the stage's call) without
and with synthetic views, interleaved per image so a shared machine's load drift hits all alike."""

import glob
import sys
import time

import numpy as np

from landmarks.config import Config, apply_updates, parse_overrides
from landmarks.features import get_model, read_image, result_settings, run_model

SETS = {
    "no views": [],
    "t=2 at 0 deg": ["extract.view_tilts=2", "extract.view_angles=0"],
    "t=2 at 0, 90 deg": ["extract.view_tilts=2", "extract.view_angles=0,90"],
}
files = sorted(
    f for f in glob.glob("../shared/data/wide_baseline_scenes/*/*") if f.lower().endswith((".jpg", ".jpeg", ".png"))
)
files = files[:: max(1, len(files) // int(sys.argv[1]))][: int(sys.argv[1])]
settings = {}
for name, ov in SETS.items():
    cfg = Config()
    apply_updates(cfg, parse_overrides(ov))
    settings[name] = result_settings(cfg, "test")
model = get_model("models/default", 2)
img, _ = read_image(files[0], settings["no views"])
run_model(model, img, settings["t=2 at 0, 90 deg"], True)
t = {k: [] for k in SETS}
cpu = {k: [] for k in SETS}
n = {k: [] for k in SETS}
for f in files:
    img, _ = read_image(f, settings["no views"])
    for name, s in settings.items():
        w0, c0 = time.perf_counter(), time.process_time()
        _, lf = run_model(model, img, s, True)
        t[name].append(time.perf_counter() - w0)
        cpu[name].append(time.process_time() - c0)
        n[name].append(len(lf))
for name in SETS:
    print(
        f"| {name} | {np.mean(t[name]):.2f} | {np.mean(cpu[name]):.2f} | {np.mean(cpu[name]) / np.mean(cpu['no views']):.2f} | {np.mean(n[name]):.0f} |"
    )
