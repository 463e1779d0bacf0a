"""Benchmark: text search of a large index by VTC alone (`python search.py --search ... --k 0`).

Builds an index of random unit features (as many as --videos, 100,000 by default) for the model of
a preset (random weights: the time does not depend on them), saves it, loads it back as search.py
does and prints the median time of search() (encoding the query, one matrix-vector product over
the index, the top results), and of loading the index.

    python benchmarks/search.py                      # tiny preset, 100,000 videos
    python benchmarks/search.py --videos 1000000 --repeats 3
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import search  # noqa: E402
from config import preset  # noqa: E402
from model import SViTT  # noqa: E402
from pretrained import text_model_path  # noqa: E402

QUERY = "a red square moves up, then a blue circle moves left"


def random_index(model, videos, seed=0):
    """An index of `videos` random unit features, with paths, as index_videos writes it."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(videos, model.config.embed_dim, generator=g)
    feat = torch.nn.functional.normalize(feat, dim=1)
    return {"kind": "video_index", "paths": [f"/videos/{i:07d}.mp4" for i in range(videos)],
            "sizes": [1_000_000] * videos, "mtimes": [0] * videos, "video_feat": feat,
            "checkpoint": "", "checkpoint_mtime": None, "frames": model.config.frames,
            "image_size": model.config.image_size, "sparsity": search.sparsity_of(model.config),
            "seed": 0, "unreadable": []}


def time_search(model, tokenizer, index, repeats, top):
    """Median seconds of one VTC-only search, the first (warm-up) run left out."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        results = search.search(model, index, QUERY, k=0, tokenizer=tokenizer, top=top)
        times.append(time.perf_counter() - start)
    assert len(results) == top
    return statistics.median(times[1:]), min(times[1:]), max(times[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=100_000)
    p.add_argument("--preset", default="tiny", choices=["tiny", "base"])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)

    config = preset(args.preset, frames=args.frames)
    model = SViTT(config, pretrained=False).eval()
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    index = random_index(model, args.videos)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.pt"
        search.save_features(index, path)
        start = time.perf_counter()
        index = search.load_features(path, "video_index")
        load_s = time.perf_counter() - start
        size = path.stat().st_size
    median, low, high = time_search(model, tokenizer, index, args.repeats, args.top)
    print(f"{args.videos} videos, {config.embed_dim}-d features, {args.preset} text encoder, "
          f"{torch.get_num_threads()} threads")
    print(f"search, VTC only (k = 0), top {args.top}: median {median * 1e3:.1f} ms "
          f"(min {low * 1e3:.1f}, max {high * 1e3:.1f}) over {args.repeats} runs")
    print(f"loading the index ({size / 2**20:.0f} MiB): {load_s:.2f} s")
    return median


if __name__ == "__main__":
    main()
