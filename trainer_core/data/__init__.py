"""Datasets of videos and images: scanning, buckets, frame sampling, captions, decoding, prefetching and caches
of latents and text embeddings."""

from .dataset import Batch, Sample, SamplePlan, VideoDataset, collate, epoch_counts, frames_to_pixels
from .latent_cache import LatentCache, LoadedBatch
from .loader import BatchRef, batch_refs, ordered_prefetch, prefetching_batches
from .scan import build_dataset
from .synthetic import make_synthetic_dataset
from .text_cache import TextEmbeddingCache, prepare_text_conditioning, unload_caption

__all__ = [
    "Batch",
    "BatchRef",
    "LatentCache",
    "LoadedBatch",
    "Sample",
    "SamplePlan",
    "TextEmbeddingCache",
    "VideoDataset",
    "batch_refs",
    "build_dataset",
    "collate",
    "epoch_counts",
    "frames_to_pixels",
    "make_synthetic_dataset",
    "ordered_prefetch",
    "prefetching_batches",
    "prepare_text_conditioning",
    "unload_caption",
]
