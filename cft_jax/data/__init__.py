"""Datasets (registry of in-memory uint8 image sets) and the input pipeline."""

from cft_jax.data.datasets import (DatasetNotFoundError, ImageDataset, REGISTRY, load_dataset,
                                   read_idx)
from cft_jax.data.pipeline import Preprocess, batches, num_batches, subsample
