"""The seed's own TensorFlow program, timed on this machine: the baseline vaekit's speed is judged against.

    pip install tensorflow-cpu        # in a separate environment: TensorFlow is no vaekit dependency
    python benchmarks/seed_tf.py --data-dir ~/.cache/vaekit/mnist --steps 300 --repeats 3

The model, loss and Adam(1e-4) step are the blog's code (../shared/seed/tf2-cvae-blog.md), run
as the blog runs them (`--mode eager`) or with the training step under `@tf.function`
(`--mode function`, TensorFlow's fast path). The data is MNIST from IDX files (the folder
`vaekit data fetch mnist` fills), thresholded at 0.5 and batched by 100 as in the blog. Prints one
JSON line per mode: img/s and ms/step, the median over repeats of --steps steps, after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from common import cpu

try:
    import tensorflow as tf
except ImportError:
    raise SystemExit("seed_tf.py needs TensorFlow: `pip install tensorflow-cpu` in an environment of its own") from None

BATCH_SIZE, LATENT_DIM = 100, 50


def read_idx_images(path: Path) -> np.ndarray:
    """An IDX3 file of uint8 images -> [N, 28, 28, 1] float32 in {0, 1} (the blog's threshold)."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    n = int.from_bytes(raw[4:8].tobytes(), "big")
    images = raw[16:].reshape(n, 28, 28, 1).astype("float32") / 255.0
    return (images >= 0.5).astype("float32")


class CVAE(tf.keras.Model):
    """The blog's model, layer for layer."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.inference_net = tf.keras.Sequential([
            tf.keras.layers.InputLayer(shape=(28, 28, 1)),
            tf.keras.layers.Conv2D(32, 3, strides=(2, 2), activation="relu"),
            tf.keras.layers.Conv2D(64, 3, strides=(2, 2), activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(latent_dim + latent_dim),
        ])
        self.generative_net = tf.keras.Sequential([
            tf.keras.layers.InputLayer(shape=(latent_dim,)),
            tf.keras.layers.Dense(units=7 * 7 * 32, activation=tf.nn.relu),
            tf.keras.layers.Reshape(target_shape=(7, 7, 32)),
            tf.keras.layers.Conv2DTranspose(64, 3, strides=(2, 2), padding="SAME", activation="relu"),
            tf.keras.layers.Conv2DTranspose(32, 3, strides=(2, 2), padding="SAME", activation="relu"),
            tf.keras.layers.Conv2DTranspose(1, 3, strides=(1, 1), padding="SAME"),
        ])

    def encode(self, x):
        return tf.split(self.inference_net(x), num_or_size_splits=2, axis=1)

    def reparameterize(self, mean, logvar):
        eps = tf.random.normal(shape=tf.shape(mean))
        return eps * tf.exp(logvar * 0.5) + mean

    def decode(self, z):
        return self.generative_net(z)


def log_normal_pdf(sample, mean, logvar, raxis=1):
    log2pi = tf.math.log(2.0 * np.pi)
    return tf.reduce_sum(-0.5 * ((sample - mean) ** 2.0 * tf.exp(-logvar) + logvar + log2pi), axis=raxis)


def compute_loss(model, x):
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    return -tf.reduce_mean(logpx_z + log_normal_pdf(z, 0.0, 0.0) - log_normal_pdf(z, mean, logvar))


def make_train_step(model, optimizer, compiled: bool):
    def train_step(x):
        with tf.GradientTape() as tape:
            loss = compute_loss(model, x)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss
    return tf.function(train_step) if compiled else train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("VAEKIT_CACHE", "~/.cache/vaekit")).expanduser()
                   / "mnist", help="folder holding train-images-idx3-ubyte")
    p.add_argument("--mode", choices=["eager", "function", "both"], default="both")
    p.add_argument("--steps", type=int, default=300, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    path = args.data_dir.expanduser() / "train-images-idx3-ubyte"
    if not path.is_file():
        raise SystemExit(f"no {path.name} in {path.parent}: run `vaekit data fetch mnist` first, or pass --data-dir")
    images = read_idx_images(path)
    batches = tf.data.Dataset.from_tensor_slices(images).shuffle(60000).batch(BATCH_SIZE).repeat()
    for mode in (["eager", "function"] if args.mode == "both" else [args.mode]):
        model = CVAE(LATENT_DIM)
        step = make_train_step(model, tf.keras.optimizers.Adam(1e-4), compiled=mode == "function")
        it = iter(batches)
        for _ in range(20):                           # warm-up: tracing, kernel selection
            step(next(it))
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = step(next(it))
            float(loss)                               # waits for the last step
            seconds.append(time.perf_counter() - start)
        per_step = statistics.median(seconds) / args.steps
        print(json.dumps({"benchmark": "seed_tf", "mode": mode, "batch_size": BATCH_SIZE,
                          "img_per_s": round(BATCH_SIZE / per_step, 1), "ms_per_step": round(1000 * per_step, 2),
                          "tensorflow": tf.__version__, "threads": os.cpu_count(), **cpu()}), flush=True)


if __name__ == "__main__":
    main()
