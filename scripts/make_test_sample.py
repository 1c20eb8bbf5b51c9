"""Build tests/data/mnist-sample/ from real MNIST, fetched by vaekit's own fetch chain.

Writes the first 2,000 train and first 500 test images and labels (canonical order) as
gzipped IDX files under the canonical names, plus a README saying how they were made.

    python scripts/make_test_sample.py
"""
from pathlib import Path

from vaekit.data import load_splits, write_idx

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "mnist-sample"
N_TRAIN, N_TEST = 2000, 500


def main() -> None:
    splits = load_splits("mnist")
    OUT.mkdir(parents=True, exist_ok=True)
    for prefix, data, n in (("train", splits.train, N_TRAIN), ("t10k", splits.test, N_TEST)):
        write_idx(OUT / f"{prefix}-images-idx3-ubyte.gz", data.images[:n, 0].numpy())
        write_idx(OUT / f"{prefix}-labels-idx1-ubyte.gz", data.labels[:n].numpy().astype("uint8"))
    (OUT / "README.md").write_text(
        f"The first {N_TRAIN:,} train and first {N_TEST:,} test images and labels of MNIST (canonical order), "
        "made by `python scripts/make_test_sample.py`, which reads them with vaekit's own `load_splits(\"mnist\")`.\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
