"""Training speed of the real `vaekit.train` on full MNIST: img/s, ms/step, test-pass time, peak memory.

    python benchmarks/train_throughput.py --precision bf16 --repeats 3
    python benchmarks/train_throughput.py --precision fp32 --device cpu
    python benchmarks/train_throughput.py --model frontier --repeats 1     # pretrained:mnist-best's recipe, one epoch
    python benchmarks/train_throughput.py --model ladder --repeats 1       # configs/mnist-ladder.json's

Each repeat is a fresh one-epoch run (60,000 images plus the test pass) in a temporary run
directory; the JSON line reports the median over repeats, read from the runs' metrics.jsonl, and
the minutes 100 epochs (each with its test pass) take at that speed. `--model frontier` trains
configs/mnist-frontier.json's recipe (spatial; pretrained:mnist-best's architecture now) instead of
the seed's, `--model ladder` configs/mnist-ladder.json's (ladder, VampPrior; pretrained:mnist-best's
until it was replaced by the spatial frontier model).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import MODELS, MODELS_HELP, emit, machine, peak_memory_mb, recipe

import vaekit
from vaekit.distributed import setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default="seed", choices=MODELS, help=f"the recipe: {MODELS_HELP}")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1, help="epochs per repeat (GPU: more, to time a long run)")
    p.add_argument("--data-dir", help="IDX files to use instead of the cache / fetch chain")
    args = p.parse_args()

    config = vaekit.Config() if args.model == "seed" else vaekit.Config.from_dict(recipe(args.model))
    config.train.precision, config.train.device = args.precision, args.device
    config.train.batch_size, config.train.epochs = args.batch_size, args.epochs
    config.data.data_dir = args.data_dir
    epochs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            run = vaekit.train(config, out=Path(tmp) / f"r{r}", log=lambda *_: None)
            epochs += run.metrics()
    rt = setup(args.device, args.precision)
    steps_per_epoch = epochs[0]["step"]
    img_s = statistics.median(m["images_per_second"] for m in epochs)
    epoch_s = statistics.median(m["epoch_seconds"] for m in epochs)
    eval_s = statistics.median(m["eval_seconds"] for m in epochs)
    emit({"benchmark": "train_throughput", "model": args.model, "batch_size": args.batch_size,
          "device": rt.device.type, "precision": rt.precision, "epochs_timed": len(epochs),
          "img_per_s": img_s, "ms_per_step": round(1000 * epoch_s / steps_per_epoch, 2),
          "epoch_s": epoch_s, "test_pass_s": eval_s, "epoch_plus_test_s": round(epoch_s + eval_s, 2),
          "minutes_per_100_epochs": round(100 * (epoch_s + eval_s) / 60, 1),
          "test_elbo_after_1_epoch": round(statistics.median(m["test_elbo"] for m in epochs if m["epoch"] == 1), 2),
          **peak_memory_mb(rt.device), **machine()})


if __name__ == "__main__":
    main()
