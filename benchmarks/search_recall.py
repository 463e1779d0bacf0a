"""Check: searching each test caption finds its video as often as eval.py's retrieval says.

Indexes the test split's videos with search.index_videos, searches every caption with
search.search (VTC over the whole index, VTM re-rank of the top --k) and counts how often the
caption's video comes first, in the top 5 and in the top 10; then runs `python eval.py` on the same
checkpoint and split and prints its text-to-video R@1/5/10 beside them, for VTC alone and with
the re-rank.

The two read the same frames with the same model and the same random attention blocks: the index
draws the blocks afresh from the seed for every batch, eval.py draws them from one seeded generator
that runs on from batch to batch, so eval.py is run with all the test videos in one batch (one
draw, the index's). The features, and the figures, then agree up to floating-point rounding.

    python benchmarks/search_recall.py --checkpoint checkpoints/frames8/last.pt
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import search  # noqa: E402
from config import SViTTConfig  # noqa: E402
from model import SViTT  # noqa: E402
from pretrained import text_model_path  # noqa: E402
from synthetic import ensure_synthetic  # noqa: E402


def load(checkpoint):
    """The checkpoint's model (eval mode) and its run info."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = SViTT(SViTTConfig.from_dict(ckpt["config"]), pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt.get("run", {})


def hit_rates(model, tokenizer, index, captions, k, batch_size):
    """Percent of (caption, video path) pairs whose video search ranks 1st, in the top 5, top 10."""
    cache, hits = {}, {1: 0, 5: 0, 10: 0}
    for caption, path in captions:
        results = search.search(model, index, caption, k, tokenizer=tokenizer, top=10,
                                batch_size=batch_size, token_cache=cache)
        ranked = [r["path"] for r in results]
        for n in hits:
            hits[n] += path in ranked[:n]
    return {n: 100.0 * h / len(captions) for n, h in hits.items()}


def eval_recall(checkpoint, annotation, video_root, k, videos):
    """t2v R@1/5/10 of `python eval.py` (VTC and VTM rankings), all videos in one batch."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(checkpoint),
                        "--data", str(annotation), "--video-root", str(video_root), "--k", str(k),
                        "--workers", "0", "--batch-size", str(videos), "--output", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    return {ranking: {n: result[ranking][f"t2v_R@{n}"] for n in (1, 5, 10)}
            for ranking in ("vtc", "vtm")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None,
                   help="test annotation (default: the checkpoint's test split)")
    p.add_argument("--video-root", default=None)
    p.add_argument("--k", type=int, default=128, help="VTM re-rank depth (eval.py's default)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, run = load(args.checkpoint)
    if args.data:
        annotation, video_root = args.data, args.video_root
    elif run.get("test_data"):
        annotation, video_root = run["test_data"], run["video_root"]
    else:  # trained on the synthetic data
        paths = ensure_synthetic()
        annotation, video_root = paths["test"], paths["video_root"]
    tokenizer = data.default_tokenizer(text_model_path(model.config.text_model))
    dataset = data.VideoTextDataset(annotation, video_root, frames=model.config.frames,
                                    image_size=model.config.image_size, train=False,
                                    mean=model.config.image_mean, std=model.config.image_std)
    captions = [(caption, os.path.abspath(dataset.video_path(video_id)))
                for caption, video_id in dataset.captions]

    start = time.perf_counter()
    index = search.index_videos(model, search.video_paths(annotation, video_root),
                                checkpoint=args.checkpoint, progress=False)
    index_s = time.perf_counter() - start
    assert not index["unreadable"], index["unreadable"]
    start = time.perf_counter()
    vtc = hit_rates(model, tokenizer, index, captions, 0, args.batch_size)
    vtc_s = time.perf_counter() - start
    start = time.perf_counter()
    vtm = hit_rates(model, tokenizer, index, captions, args.k, args.batch_size)
    vtm_s = time.perf_counter() - start
    reference = eval_recall(args.checkpoint, annotation, video_root, args.k, len(index["paths"]))

    print(f"{args.checkpoint}: T={model.config.frames}; {annotation}: {len(captions)} captions, "
          f"{len(index['paths'])} videos (indexed in {index_s:.0f} s)")
    print(f"{'':28}{'top1/R@1':>10}{'top5/R@5':>10}{'top10/R@10':>12}")
    rows = [("search, VTC (k = 0)", vtc), ("eval.py t2v, VTC", reference["vtc"]),
            (f"search, VTM top {args.k}", vtm),
            (f"eval.py t2v, VTM top {args.k}", reference["vtm"])]
    for name, r in rows:
        print(f"{name:28}{r[1]:>10.1f}{r[5]:>10.1f}{r[10]:>12.1f}")
    print(f"search time per caption: {vtc_s / len(captions) * 1e3:.0f} ms (VTC), "
          f"{vtm_s / len(captions) * 1e3:.0f} ms (VTM, tokens cached across captions)")
    return {"search_vtc": vtc, "search_vtm": vtm, "eval": reference}


if __name__ == "__main__":
    main()
