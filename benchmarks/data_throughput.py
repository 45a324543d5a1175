"""Data-pipeline throughput: samples per second for 33-frame samples at resolution 512 from 10-second 1080p clips.

Writes a few synthetic 1080p clips (30 fps, H.264 "superfast", a keyframe every second as phones write them) into a
temporary folder, then times, on the CPU:

* uncached samples (decode + resize + crop + to float pixels), uniform sampling (33 frames spread over the clip)
  and fps sampling (a 2 s window at 16 fps from a random start), decoding from the start vs. seeking, in this
  process vs. in DataLoader worker processes;
* the same fps-window samples consumed by a simulated training step that keeps the CPU idle (as a GPU step does),
  in this process vs. in workers (the overlap the workers exist for);
* cached latents (filled once with a cheap fake encoder, so the timed pass measures reading them back), in this
  process vs. in workers.

The default preset is "superfast" rather than "ultrafast": ultrafast turns off CABAC and the deblocking filter, so
its streams decode about 2.5x faster than camera H.264 and would flatter decoding.

Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/data_throughput.py [--clips 3] [--samples 8] [--workers 2] [--step 0.5]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch

from trainer_core.config import DatasetConfig
from trainer_core.data import LatentCache, batch_refs, build_dataset, frames_to_pixels, prefetching_batches
from trainer_core.data.media import read_frames

WIDTH, HEIGHT, FPS, SECONDS = 1920, 1080, 30, 10


def write_clip(path: Path, seed: int, gop: int, preset: str) -> None:
    """A 10 s 1080p clip: a blocky random texture panning right and down, H.264."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        options = {"preset": preset, "crf": "23", "g": str(gop)}
        stream = container.add_stream("libx264", rate=FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(FPS * SECONDS):
            frame = np.roll(texture, (i // 2, 4 * i), axis=(0, 1))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """Latent-shaped output [B, 16, (F-1)/4+1, H/8, W/8] at almost no cost."""
    return pixels[:, :, ::4, ::8, ::8].repeat(1, 6, 1, 1, 1)[:, :16].contiguous()


def timed(samples: int, run: Callable[[], None]) -> tuple[int, float]:
    t0 = time.perf_counter()
    run()
    return samples, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=3, help="synthetic 10 s 1080p clips")
    parser.add_argument("--samples", type=int, default=8, help="samples timed per case")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--gop", type=int, default=FPS, help="frames between keyframes in the clips")
    parser.add_argument("--preset", default="superfast", help="x264 preset of the clips")
    parser.add_argument("--step", type=float, default=0.5, help="seconds of the simulated (CPU-idle) training step")
    args = parser.parse_args()
    n = args.samples
    print("command:", "PYTHONPATH=. .venv/bin/python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    print(f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, av {av.__version__}")
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clips"
        folder.mkdir()
        t0 = time.perf_counter()
        for i in range(args.clips):
            write_clip(folder / f"clip{i}.mp4", i, args.gop, args.preset)
            (folder / f"clip{i}.txt").write_text(f"synthetic clip {i}")
        took = time.perf_counter() - t0
        print(f"wrote {args.clips} clips ({WIDTH}x{HEIGHT}, {FPS} fps, {SECONDS} s, {args.preset}) in {took:.1f} s")

        def dataset(**kw):
            base = dict(folder=str(folder), resolutions=[512], num_frames=33, caption_dropout=0.0, repeats=n)
            return build_dataset([DatasetConfig(**(base | kw))], None, 0)

        t0 = time.perf_counter()
        uniform, window = dataset(frame_sampling="uniform"), dataset(frame_sampling="fps")
        print(f"dataset build (probe + black-bar check, twice): {time.perf_counter() - t0:.1f} s")
        w, h, f = uniform.items[0].bucket_key
        print(f"sample: {f} frames at {w}x{h} (the resolution-512 bucket of 16:9)")

        def serial(ds, seek: bool) -> Callable[[], None]:
            def run() -> None:
                for ids in ds.batches(0, 1)[:n]:
                    plan = ds.plan(ids[0], 0)
                    frames_to_pixels(read_frames(ds.items[plan.item].media, plan.frame_indices, plan.bucket, seek))

            return run

        def loader(ds, workers: int, step: float = 0.0) -> Callable[[], None]:
            """Batches of one sample from prefetching_batches (0 workers: in this process), ``step`` s apart."""

            def run() -> None:
                for _ in prefetching_batches(ds, ds.batches(0, 1)[:n], 0, workers):
                    time.sleep(step)

            return run

        timed(1, lambda: uniform.load(0, 0))  # warm-up: first decode, caches, lazy initialisation
        rows = [
            ("uncached, uniform, serial, decode from start", timed(n, serial(uniform, False))),
            ("uncached, uniform, serial, seek", timed(n, serial(uniform, True))),
            (f"uncached, uniform, {args.workers} workers, seek", timed(n, loader(uniform, args.workers))),
            ("uncached, fps window, serial, decode from start", timed(n, serial(window, False))),
            ("uncached, fps window, serial, seek", timed(n, serial(window, True))),
            (f"uncached, fps window, {args.workers} workers, seek", timed(n, loader(window, args.workers))),
            (f"fps window + {args.step:g} s idle step, serial", timed(n, loader(window, 0, args.step))),
            (
                f"fps window + {args.step:g} s idle step, {args.workers} workers",
                timed(n, loader(window, args.workers, args.step)),
            ),
        ]

        cached = dataset(frame_sampling="fps", window_start="start", cache_latents=True)
        m = 10 * n  # reading is fast: time more samples
        refs = list(itertools.islice(batch_refs(cached, 1), m))
        cache = LatentCache(Path(tmp) / "latents", "fake-vae")
        for ref in refs:  # untimed pass: encodes and stores each clip's one latent (its window from the start)
            cache.get_or_encode(cached, ref.sample_ids, ref.epoch, fake_encode)

        def cached_serial() -> None:
            for ref in refs:
                cache.get_or_encode(cached, ref.sample_ids, ref.epoch, fake_encode)

        def cached_workers() -> None:
            stream = cache.prefetch(cached, refs, args.workers)
            for _, loaded in stream:
                cache.finish(loaded, fake_encode)

        hits = cache.hits
        rows += [
            ("cached latents, serial", timed(m, cached_serial)),
            (f"cached latents, {args.workers} workers", timed(m, cached_workers)),
        ]
        assert cache.hits - hits == 2 * m, "the cached passes must read every latent from disk"
        lat = cache.get_or_encode(cached, refs[0].sample_ids, 0, fake_encode)
        print(f"latent per sample: {tuple(lat.shape[1:])} float32, {lat[0].numel() * 4 / 2**20:.1f} MiB")

    print()
    print(
        f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (this benchmark adds about "
        f"1 to 2; more means other processes shared the {os.cpu_count()} cores)"
    )
    print(f"{'case':<52} {'samples':>7} {'seconds':>8} {'samples/s':>10}")
    for name, (count, seconds) in rows:
        print(f"{name:<52} {count:>7} {seconds:>8.2f} {count / seconds:>10.2f}")


if __name__ == "__main__":
    main()
