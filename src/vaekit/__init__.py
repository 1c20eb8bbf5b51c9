"""vaekit: train variational autoencoders on images and generate new ones.

    import vaekit
    run = vaekit.train(vaekit.Config(), out="runs/mnist")      # the seed's CVAE on MNIST
    vaekit.sample_to_png(run.path, n=100)
"""
from .api import dataset_info, fetch, make_gif, reconstruct_to_png, sample_to_png, train
from .config import Config, ConfigError, DataConfig, TrainConfig
from .data import DataError, load_splits
from .generate import reconstruct, sample
from .models import ConvVAE, ConvVAEConfig
from .runs import Run, RunError, load_model

__all__ = [
    "Config", "ConfigError", "ConvVAE", "ConvVAEConfig", "DataConfig", "DataError", "Run", "RunError",
    "TrainConfig", "dataset_info", "fetch", "load_model", "load_splits", "make_gif", "reconstruct",
    "reconstruct_to_png", "sample", "sample_to_png", "train",
]
__version__ = "0.1.0"
