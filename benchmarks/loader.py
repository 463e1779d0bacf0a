"""Benchmark: clips per second of the training loader (decode, sample, crop, tokenize, mask).

Runs on the synthetic train split (made once by `synthetic.py`), T = 4 and 8, with 0 and 2
DataLoader workers, batches of 32 clips at 112 px.

    python benchmarks/loader.py [--tokenizer NAME] [--data-dir data/synthetic]
"""
import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collate  # noqa: E402
import data  # noqa: E402
from synthetic import ensure_synthetic  # noqa: E402


def loader_throughput(paths, tokenizer, *, frames, workers, image_size=112,
                      batch_size=32, num_batches=20):
    """Clips per second of a training DataLoader (decode, crop, collate, tokenize, mask).

    The first batch, which pays for starting the workers, is not timed.
    """
    dataset = data.VideoTextDataset(paths["train"], paths["video_root"], frames=frames,
                               image_size=image_size, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         collate_fn=collate.make_collate(tokenizer))
    batches = iter(loader)
    next(batches)
    clips = 0
    start = time.perf_counter()
    for batch in itertools.islice(batches, min(num_batches, len(loader) - 1)):
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - start)


def benchmark(paths, tokenizer):
    print(f"loader throughput, synthetic train split, batch 32, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads in the main process (clips/s)")
    for frames in (4, 8):
        for workers in (0, 2):
            rate = loader_throughput(paths, tokenizer, frames=frames, workers=workers)
            print(f"  T={frames}  workers={workers}  {rate:8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer (default: data.default_tokenizer)")
    parser.add_argument("--data-dir", default="data/synthetic", help="synthetic data set folder")
    args = parser.parse_args(argv)
    benchmark(ensure_synthetic(args.data_dir), data.default_tokenizer(args.tokenizer))


if __name__ == "__main__":
    main()
