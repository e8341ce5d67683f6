"""Images/s of the exported models on the same demo images, the models taking turns per image
(load bursts on a shared machine hit all alike): test-side call (global + local) and global only."""

import sys
import time

import numpy as np

from landmarks import features
from landmarks.config import load_config
from landmarks.datasets.data import load_split
from landmarks.datasets.images import load_image
from landmarks.delg.delg_io import read_model_meta
from landmarks.delg.model import build_backbone
from landmarks.tools.bench.extraction import backbone_flops

models = sys.argv[1].split(",")
n_img, repeats = int(sys.argv[2]), int(sys.argv[3])
cfg = load_config(None, [])
settings = features.result_settings(cfg)
src = sys.argv[4] if len(sys.argv) > 4 else "data/demo"
if src == "data/demo":
    paths = load_split("data/demo", "train")["path"].tolist()[:n_img]
else:  # a photo folder: its first n_img images by name
    from pathlib import Path

    paths = sorted(str(p) for p in Path(src).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n_img]
images = [load_image(p, settings["max_image_size"], settings["max_image_pixels"], settings["min_image_size"])[0] for p in paths]
calls = {"global+local": features.model_call(settings, local=True), "global only": features.model_call(settings, local=False)}
loaded = {m: features.get_model(m, 2) for m in models}
for m in models:  # trace
    for scales, rows, cap in calls.values():
        features.describe_image(loaded[m], images[0], scales, cap, settings["abs_thres"], rows)
times = {(m, c): [] for m in models for c in calls}
cpu = {(m, c): [] for m in models for c in calls}
for _ in range(repeats):
    tot = dict.fromkeys(times, 0.0)
    ctot = dict.fromkeys(times, 0.0)
    for im in images:
        for c, (scales, rows, cap) in calls.items():
            for m in models:
                t, tc = time.perf_counter(), time.process_time()
                features.describe_image(loaded[m], im, scales, cap, settings["abs_thres"], rows)
                tot[(m, c)] += time.perf_counter() - t
                ctot[(m, c)] += time.process_time() - tc
    for k in times:
        times[k].append(tot[k])
        cpu[k].append(ctot[k])
print(f"{n_img} images of {src}, {np.mean([im.shape[0] * im.shape[1] for im in images]) / 1e6:.2f} Mpix mean, "
      f"{repeats} repeats (median); calls: " + "; ".join(f"{c}: scales {s}" for c, (s, _, _) in calls.items()))
print("| model | backbone | GFLOP at 512x512 | CPU s/image global+local | CPU s/image global only | wall images/s global+local | wall images/s global only |")
print("|---|---|---|---|---|---|---|")
for m in models:
    name = read_model_meta(m)["backbone"]
    fl = backbone_flops(build_backbone(name, "random"), 512) / 1e9
    ips = [n_img / float(np.median(times[(m, c)])) for c in calls]
    cs = [float(np.median(cpu[(m, c)])) / n_img for c in calls]
    print(f"| `{m}` | {name} | {fl:.2f} | {cs[0]:.2f} | {cs[1]:.2f} | {ips[0]:.2f} | {ips[1]:.2f} |")
