"""An image folder larger than it need be held in memory (issue 26): decode time, then training
memory per rank and speed with 2 ranks. Prints JSON lines.

    python benchmarks/data_scale.py make 200000 /tmp/vaekit-scale-200000   # the folder (not committed)
    python benchmarks/data_scale.py run 50000 200000 --steps 200           # makes missing folders too

`make` writes N 64x64 RGB PNGs (MNIST sample digits, upscaled, each tinted and shifted by its own
index so that no two are alike) in 10 class folders, in parallel processes. `run`, for each N:
decodes the folder into a fresh cache (vaekit.data.load_folder: parallel processes, the .npy
cache), reads it again from the cache, then trains `--steps` steps of a conv VAE at 64 px on 2
torchrun ranks (gloo, CPU) reading the memory-mapped splits as `vaekit train` does (splits_for),
each rank sampling its RssAnon (private memory: what would grow if the data were copied into the
process) and RssFile (pages of the mapped cache it touched: shared with the other rank through the
page cache) every 0.1 s. The figure that must not grow with N is the peak RssAnon.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "mnist-sample"
SIZE = 64


def _write_images(root: str, indices: range) -> None:
    from PIL import Image

    from vaekit.data import read_idx

    labels = read_idx(SAMPLE / "train-labels-idx1-ubyte.gz")
    digits = [np.asarray(Image.fromarray(d).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float32)
              for d in read_idx(SAMPLE / "train-images-idx3-ubyte.gz")]            # 2000 x [64, 64]
    for i in indices:
        j = i % len(digits)
        tint = np.array([(i * 37) % 256, (i * 101) % 256, (i // 7) % 256], np.float32) / 255   # [3], per image
        rgb = np.roll(digits[j], i % 9 - 4, axis=1)[..., None] * (0.4 + 0.6 * tint)          # [64, 64, 3]
        path = Path(root) / str(labels[j]) / f"{i:07d}.png"
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(path, compress_level=1)


def make(n: int, root: Path) -> None:
    start = time.perf_counter()
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    step = 5000
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_images, [str(root)] * len(range(0, n, step)),
                      [range(s, min(n, s + step)) for s in range(0, n, step)]))
    (root / ".complete").write_text(str(n))
    print(json.dumps({"made": n, "folder": str(root), "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def decode(n: int, root: Path, cache: Path) -> None:
    """Times the first decode (into an empty cache) and the read of the finished entry."""
    os.environ["VAEKIT_CACHE"] = str(cache)
    from vaekit.data import load_folder

    start = time.perf_counter()
    data = load_folder(root, SIZE, 3, 0.1, 0, log=lambda line: None)
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    load_folder(root, SIZE, 3, 0.1, 0, log=lambda line: None)
    cached = time.perf_counter() - start
    size = sum(p.stat().st_size for p in data.cache.iterdir())
    print(json.dumps({"images": n, "decode_s": round(decoded, 1), "decode_img_per_s": round(n / decoded),
                      "workers": len(os.sched_getaffinity(0)), "cache_mb": round(size / 2**20),
                      "cached_load_s": round(cached, 2)}), flush=True)


def _memory() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) // 1024 for k in ("RssAnon", "RssFile", "VmHWM")}   # MiB


def rank(n: int, root: Path, steps: int, batch: int) -> None:
    """One torchrun rank: `steps` steps of the conv VAE on the memory-mapped folder, as train does."""
    import torch

    from vaekit.config import DataConfig
    from vaekit.data import preprocess, splits_for
    from vaekit.distributed import setup
    from vaekit.models import ModelConfig, build_model
    from vaekit.objectives import training_loss

    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            for key, value in _memory().items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)

    threading.Thread(target=sample, daemon=True).start()
    rt = setup("cpu", "fp32", distributed=True)
    splits = splits_for(DataConfig(dataset="folder", data_dir=str(root), resize=SIZE, channels=3), log=lambda _: None)
    images = splits.train.images                                  # uint8 [N, 3, 64, 64], memory-mapped
    after_load = _memory()
    torch.manual_seed(0)
    model = rt.wrap(build_model(ModelConfig(image_size=SIZE, image_channels=3)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    rt.barrier()
    start = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch][rt.shard(batch)]
        x = preprocess(images[idx].to(rt.device), "static")       # only this batch leaves the mapping
        loss = training_loss(model(x)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    rt.barrier()
    elapsed = time.perf_counter() - start
    done.set()
    print(json.dumps({"images": n, "rank": rt.rank, "steps": steps, "global_batch": batch,
                      "img_per_s": round(steps * batch / elapsed, 1), "after_load_rss_anon_mb": after_load["RssAnon"],
                      "peak_rss_anon_mb": peaks["RssAnon"], "peak_rss_file_mb": peaks["RssFile"],
                      "vm_hwm_mb": _memory()["VmHWM"], "threads": torch.get_num_threads()}), flush=True)
    rt.close()


def run(sizes: list[int], steps: int, batch: int) -> None:
    for n in sizes:
        root, cache = Path(f"/tmp/vaekit-scale-{n}"), Path(f"/tmp/vaekit-scale-cache-{n}")
        if not (root / ".complete").is_file():
            make(n, root)
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        subprocess.run([sys.executable, __file__, "decode", str(n), str(root), str(cache)], check=True, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "rank", str(n), str(root), str(steps), str(batch)], check=True,
                       env={**env, "VAEKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("n", type=int)
    m.add_argument("root", type=Path)
    r = sub.add_parser("run")
    r.add_argument("sizes", type=int, nargs="+")
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--batch", type=int, default=64, help="the global batch")
    d = sub.add_parser("decode")   # run's children
    d.add_argument("n", type=int)
    d.add_argument("root", type=Path)
    d.add_argument("cache", type=Path)
    k = sub.add_parser("rank")
    k.add_argument("n", type=int)
    k.add_argument("root", type=Path)
    k.add_argument("steps", type=int)
    k.add_argument("batch", type=int)
    args = p.parse_args()
    if args.command == "make":
        make(args.n, args.root)
    elif args.command == "run":
        run(args.sizes, args.steps, args.batch)
    elif args.command == "decode":
        decode(args.n, args.root, args.cache)
    else:
        rank(args.n, args.root, args.steps, args.batch)


if __name__ == "__main__":
    main()
