"""vaekit: train variational autoencoders on images and generate new ones.

    import vaekit
    run = vaekit.train(vaekit.Config(), out="runs/mnist")      # the seed's CVAE on MNIST
    vaekit.sample_to_png(run.path, n=100)
    vaekit.sample_to_png("pretrained:mnist")                   # the seed's model, trained for 100 epochs
"""
from .api import (attribute_to_png, dataset_info, eval_to_json, export_run, fetch, inpaint_to_png,
                  interpolate_to_png, latent_map_to_png, make_gif, plot_runs, reconstruct_to_png, sample_to_png, train,
                  train_prior, traverse_to_png)
from .config import Config, DataConfig, TrainConfig
from .data import load_splits, splits_for
from .errors import ConfigError, DataError, RunError, VaekitError
from .evaluate import likelihood_report
from .generate import (apply_attribute, attribute_vector, inpaint, interpolate, manifold, prior_samples, reconstruct,
                       traverse)
from .models import VQVAE, ConvVAE, ModelConfig
from .loading import OpenRun, load_model, open_for_inference
from .runs import Run

__all__ = [
    "Config", "ConfigError", "ConvVAE", "ModelConfig", "DataConfig", "DataError", "Run", "RunError", "VaekitError",
    "TrainConfig", "dataset_info", "fetch", "splits_for", "load_model", "load_splits", "make_gif", "reconstruct",
    "reconstruct_to_png", "prior_samples", "sample_to_png", "train", "train_prior", "VQVAE",
    "likelihood_report", "eval_to_json", "interpolate", "interpolate_to_png", "traverse", "traverse_to_png",
    "attribute_vector", "apply_attribute", "attribute_to_png", "inpaint", "inpaint_to_png", "manifold",
    "latent_map_to_png", "plot_runs", "export_run", "open_for_inference", "OpenRun",
]
__version__ = "0.1.0"
