"""Datasets of videos and images: scanning, buckets, frame sampling, captions, decoding and latent caching."""

from .dataset import Batch, Sample, SamplePlan, VideoDataset, build_dataset, collate, epoch_counts
from .latent_cache import LatentCache
from .synthetic import make_synthetic_dataset

__all__ = [
    "Batch",
    "LatentCache",
    "Sample",
    "SamplePlan",
    "VideoDataset",
    "build_dataset",
    "collate",
    "epoch_counts",
    "make_synthetic_dataset",
]
