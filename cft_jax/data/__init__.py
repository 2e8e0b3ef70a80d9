"""Datasets (registry: in-memory uint8 sets and streamed image folders / tfds sources), host
preprocessing, the grain input pipeline and the device-side preprocessing."""

from cft_jax.data.datasets import (CONFIG_KEYS, ImageDataset, REGISTRY, STREAMED, data_options,
                                   load_dataset, read_idx, stratified_split)
from cft_jax.data.loader import TaskBatches, eval_batches
from cft_jax.data.preprocess import HostTransform
from cft_jax.data.sources import (BadDataError, DatasetNotFoundError, MissingDependencyError,
                                  StreamingDataset)
from cft_jax.data.pipeline import Preprocess, batches, num_batches, subsample
