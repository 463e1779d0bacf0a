"""Index one's own videos by their VTC features, search them with a sentence, look at the answers.

From the command line:

    python search.py --index VIDEO_DIR_OR_ANNOTATION --checkpoint CK --output index.pt
    python search.py --index index.pt --search "a red square moves up, then a blue circle falls"
    python search.py --embed-text captions.txt --checkpoint CK --output captions.pt

In Python, with a model already built (`model.eval()`) and its tokenizer:

    index = index_videos(model, video_paths("my_videos/"), checkpoint="ck/last.pt")
    save_features(index, "index.pt")
    results = search(model, load_features("index.pt", "video_index"), "a dog catches a ball",
                     k=16, tokenizer=tokenizer)
    contact_sheet(results, "answers.png")       # pictures.py

Ranking is that of retrieval in eval.py (Singularity): the VTC similarity of the query's feature
with every video's (Eq. 29) ranks the whole index, then the top k are re-scored by the VTM head,
log p(match) (Eq. 30) or the match logit (the config's vtm_score), and placed above the rest in
that order; the rest keep their VTC order.
`k = 0` ranks by VTC alone: one text encoding and one matrix-vector product.

A clip is read as evaluation reads it (the middle frame of T equal segments, the whole frame
resized, normalised with the model config's image_mean and image_std) and encoded with the random
attention blocks drawn from `seed`, one fresh draw per batch.
Random blocks are shared by the clips of a batch (sparse_attention.py), so every batch gets the
same blocks and a video's feature depends only on the video, the model and the seed: an index grown
later, and the tokens the VTM re-rank computes again, agree with the first pass.

Feature files are dicts of tensors, lists, strings and numbers, so that
`torch.load(path, weights_only=True)` reads them:

    index: {"kind": "video_index", "paths": [absolute path, ...], "sizes": [bytes, ...],
            "mtimes": [ns, ...], "video_feat": float (N, e), "checkpoint": str,
            "checkpoint_mtime": ns or None, "frames": T, "image_size": S,
            "image_mean": [3 floats], "image_std": [3 floats], "sparsity": {block_size,
            local_blocks, random_blocks, keep_rate_v, keep_rate_m}, "seed": int,
            "unreadable": [[path, reason], ...]}
    text:  {"kind": "text_features", "captions": [str, ...], "text_feat": float (M, e),
            "checkpoint": str}

Both hold unit-length features in the joint space of VTC: `text_feat @ video_feat.T` is the
similarity that ranks.
"""
import argparse
import json
import os
import pickle
import time
from pathlib import Path

import torch
from tqdm import tqdm

import collate
import data
from checkpoint import latest_checkpoint, load_model
from pictures import contact_sheet, sheet_name
from pretrained import text_model_path

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov")


# --------------------------------------------------------------------------------------------
# Videos to index
# --------------------------------------------------------------------------------------------

def video_paths(source, video_root=None) -> list[str]:
    """Absolute paths of the videos to index: every file under a folder whose name ends in one of
    VIDEO_EXTENSIONS (any case, recursively, sorted), the unique videos of an annotation JSON in
    their order (relative to `video_root`, by default the annotation's folder), or one video."""
    source = Path(source)
    if source.is_dir():
        found = source.rglob("*")
        return sorted(os.path.abspath(p) for p in found
                      if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such folder, video or annotation file")
    if source.suffix.lower() in VIDEO_EXTENSIONS:
        return [os.path.abspath(source)]
    entries = data.load_annotation(source)
    root = Path(video_root) if video_root else source.parent
    return [os.path.abspath(root / video) for video in dict.fromkeys(e["video"] for e in entries)]


def read_clip(path: str, frames: int, image_size: int, mean=data.IMAGENET_MEAN,
              std=data.IMAGENET_STD) -> torch.Tensor:
    """A clip as evaluation reads it: float (T, 3, S, S), normalised with `mean` and `std` (the
    model config's image_mean and image_std); VideoReadError naming the file if not."""
    reader = data.open_video(path)
    indices = data.sample_frame_indices(len(reader), frames, train=False)
    return data.transform_frames(data.read_frames(reader, indices, path), image_size=image_size,
                                 train=False, mean=mean, std=std)


def normalisation_of(index) -> tuple:
    """(image_mean, image_std) an index's clips were read with; an index written before these
    were recorded was read with the ImageNet statistics."""
    return (index.get("image_mean", list(data.IMAGENET_MEAN)),
            index.get("image_std", list(data.IMAGENET_STD)))


class _Clips(torch.utils.data.Dataset):
    """(position, clip or None, why not) of each path, so that DataLoader workers do the decoding
    and an unreadable file is reported rather than raised."""

    def __init__(self, paths, frames, image_size, mean, std):
        self.paths, self.frames, self.image_size = paths, frames, image_size
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            clip = read_clip(self.paths[i], self.frames, self.image_size, self.mean, self.std)
            return i, clip, None
        except data.VideoReadError as error:
            return i, None, error.reason


def _as_list(items):
    return items


def sparsity_of(config) -> dict:
    return {"block_size": config.block_size, "local_blocks": config.local_blocks,
            "random_blocks": config.random_blocks, "keep_rate_v": config.keep_rate_v,
            "keep_rate_m": config.keep_rate_m}


def model_overrides(index) -> dict:
    """The test-time sparsity an index was made with, as keyword arguments of
    checkpoint.load_model."""
    s = index["sparsity"]
    if s["block_size"] is None and s["keep_rate_v"] == 1 and s["keep_rate_m"] == 1:
        return {"dense": True}
    blocks = (s["local_blocks"], s["random_blocks"], s["block_size"]) if s["block_size"] else None
    return {"keep_rate_v": s["keep_rate_v"], "keep_rate_m": s["keep_rate_m"], "blocks": blocks}


def _device(model, device):
    return torch.device(device) if device is not None else next(model.parameters()).device


def encode_clips(model, clips, seed, device):
    """f_v of a batch of clips (B, T, 3, S, S) with the random blocks drawn from `seed`:
    -> tokens (B, 1 + N', d) and VTC features (B, e), on the CPU."""
    generator = torch.Generator(device).manual_seed(seed)
    tokens, _, feat = model.encode_video(clips.to(device), generator)
    return tokens.cpu(), feat.float().cpu()


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def index_videos(model, paths, *, device=None, checkpoint="", batch_size=16, workers=0, seed=0,
                 existing=None, progress=True) -> dict:
    """VTC features of the videos at `paths` (see the module docstring for the dict returned).

    A video of `existing` (an index made earlier) with the same path, size and modification time,
    made with the same checkpoint, frames, sparsity and seed, keeps its feature and is not read
    again; an `existing` made otherwise is ignored, with a message. Files that cannot be read are
    listed in "unreadable" with the reason and left out. `checkpoint` names the checkpoint the model
    came from (recorded, and compared with `existing`'s)."""
    device = _device(model, device)
    config = model.config
    checkpoint = os.path.abspath(checkpoint) if checkpoint else ""
    stamp = os.stat(checkpoint).st_mtime_ns if os.path.isfile(checkpoint) else None
    settings = {"checkpoint": checkpoint, "checkpoint_mtime": stamp,
                "frames": config.frames, "image_size": config.image_size,
                "image_mean": list(config.image_mean), "image_std": list(config.image_std),
                "sparsity": sparsity_of(config), "seed": seed}
    reusable = {}
    if existing is not None:
        changed = [key for key, value in settings.items() if existing.get(key) != value]
        if changed:
            print(f"the existing index differs in {', '.join(changed)}: every video is read again")
        else:
            reusable = {(p, s, m): i for i, (p, s, m) in
                        enumerate(zip(existing["paths"], existing["sizes"], existing["mtimes"]))}

    feats, stamps, unreadable, todo, encoded = {}, {}, {}, [], 0
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError as error:
            unreadable[i] = error.strerror or str(error)
            continue
        stamps[i] = (st.st_size, st.st_mtime_ns)
        j = reusable.get((path, *stamps[i]))
        if j is None:
            todo.append(i)
        else:
            feats[i] = existing["video_feat"][j]

    clips = _Clips([paths[i] for i in todo], config.frames, config.image_size,
                   config.image_mean, config.image_std)
    loader = torch.utils.data.DataLoader(clips, batch_size=batch_size, num_workers=workers,
                                         collate_fn=_as_list)
    with tqdm(total=len(todo), unit="video", desc="indexing", disable=not progress) as bar:
        for items in loader:
            readable = [(todo[j], clip) for j, clip, _ in items if clip is not None]
            unreadable.update((todo[j], reason) for j, clip, reason in items if clip is None)
            if readable:
                batch = torch.stack([clip for _, clip in readable])  # (B, T, 3, S, S)
                _, feat = encode_clips(model, batch, seed, device)
                feats.update((i, f) for (i, _), f in zip(readable, feat))
                encoded += len(readable)
            bar.update(len(items))

    kept = sorted(feats)
    if progress:
        print(f"indexed {len(kept)} videos ({encoded} read, {len(kept) - encoded} kept from the "
              f"existing index), {len(unreadable)} unreadable")
        for i in sorted(unreadable):
            print(f"  unreadable: {paths[i]}: {unreadable[i]}")
    video_feat = torch.stack([feats[i] for i in kept]) if kept else torch.zeros(0, config.embed_dim)
    return {"kind": "video_index", "paths": [paths[i] for i in kept],
            "sizes": [stamps[i][0] for i in kept], "mtimes": [stamps[i][1] for i in kept],
            "video_feat": video_feat,
            **settings, "unreadable": [[paths[i], unreadable[i]] for i in sorted(unreadable)]}


# --------------------------------------------------------------------------------------------
# Text features
# --------------------------------------------------------------------------------------------

def read_captions(path) -> list[str]:
    """One caption a line; blank lines are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise ValueError(f"{path}: no captions (one caption a line)")
    return captions


@torch.no_grad()
def encode_captions(model, tokenizer, captions, device=None):
    """f_t of captions: hidden states (B, L, C), attention mask (B, L), VTC features (B, e)."""
    device = _device(model, device)
    text = collate.tokenize_captions(tokenizer, captions, model.config.text_len)
    mask = text["attention_mask"].to(device)
    states, feat = model.encode_text(text["input_ids"].to(device), mask)
    return states, mask, feat.float()


@torch.no_grad()
def embed_texts(model, tokenizer, captions, *, device=None, checkpoint="", batch_size=128) -> dict:
    """VTC features of captions (see the module docstring for the dict returned)."""
    feats = [encode_captions(model, tokenizer, captions[start:start + batch_size], device)[2].cpu()
             for start in range(0, len(captions), batch_size)]
    return {"kind": "text_features", "captions": list(captions),
            "text_feat": torch.cat(feats) if feats else torch.zeros(0, model.config.embed_dim),
            "checkpoint": os.path.abspath(checkpoint) if checkpoint else ""}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def save_features(features: dict, path) -> None:
    """Write an index or text features atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(features, tmp)
    os.replace(tmp, path)


def load_features(path, kind: str) -> dict:
    """Read a file written by save_features; `kind` is "video_index" or "text_features"."""
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"{path} is not a feature file ({reason})") from None
    if not isinstance(features, dict) or features.get("kind") != kind:
        found = features.get("kind") if isinstance(features, dict) else type(features).__name__
        raise ValueError(f"{path} holds {found!r}, not a {kind} "
                         f"(made by search.py --index or --embed-text)")
    return features


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------

def check_index(model, index) -> None:
    """The model must read clips as the index did, or its re-rank would see other tokens."""
    config = model.config
    ours = {"frames": config.frames, "image_size": config.image_size,
            "normalisation": (list(config.image_mean), list(config.image_std)),
            "sparsity": sparsity_of(config)}
    theirs = {key: index.get(key) for key in ours}
    theirs["normalisation"] = normalisation_of(index)
    if ours != theirs:
        raise ValueError(f"the index was made with {theirs}, the model has {ours}")
    if index["video_feat"].shape[1:] != (config.embed_dim,):
        raise ValueError(f"the index holds {tuple(index['video_feat'].shape[1:])} features, "
                         f"the model makes ({config.embed_dim},)")


@torch.no_grad()
def video_tokens(model, index, positions, *, device=None, batch_size=16, cache=None):
    """f_v tokens of the index's videos at `positions`, read from their files again: a list with a
    tensor (1 + N', d) or, for a file that can no longer be read, None. `cache` (a dict kept by the
    caller) holds tokens already computed, by path."""
    device = _device(model, device)
    cache = {} if cache is None else cache
    paths = [index["paths"][p] for p in positions]
    missing = [path for path in dict.fromkeys(paths) if path not in cache]
    for start in range(0, len(missing), batch_size):
        clips = []
        for path in missing[start:start + batch_size]:
            try:
                clip = read_clip(path, index["frames"], index["image_size"],
                                 *normalisation_of(index))
                clips.append((path, clip))
            except data.VideoReadError as error:
                print(f"skipping the VTM score of {path}: {error.reason}")
                cache[path] = None
        if clips:
            batch = torch.stack([clip for _, clip in clips])  # (B, T, 3, S, S)
            tokens, _ = encode_clips(model, batch, index["seed"], device)
            cache.update((path, t) for (path, _), t in zip(clips, tokens))
    return [cache[path] for path in paths]


@torch.no_grad()
def search(model, index, query, k=16, *, tokenizer, top=10, device=None, batch_size=16,
           token_cache=None) -> list[dict]:
    """The `top` videos of the index for a text query, best first: a list of {"rank", "path",
    "vtc", "vtm"} (vtm None where not re-scored). VTC similarity ranks every video; the first k
    are re-scored by VTM and placed above the rest by that score (as eval.rerank does)."""
    check_index(model, index)
    device = _device(model, device)
    states, mask, feat = encode_captions(model, tokenizer, [query], device)
    sim = index["video_feat"] @ feat[0].cpu()  # (N,): Eq. 29's similarity with every video
    k, top = min(k, len(sim)), min(top, len(sim))
    order = sim.topk(max(k, top)).indices.tolist()
    vtm = {}
    if k:
        tokens = video_tokens(model, index, order[:k], device=device, batch_size=batch_size,
                              cache=token_cache)
        scored = [(p, t) for p, t in zip(order[:k], tokens) if t is not None]
        for start in range(0, len(scored), batch_size):
            part = scored[start:start + batch_size]
            video = torch.stack([t for _, t in part]).to(device)  # (B, 1 + N', d)
            logits = model.match_logits(states.expand(len(part), -1, -1),
                                        mask.expand(len(part), -1), video)  # (B, 2)
            logits = logits.float()
            if model.config.vtm_score == "log_softmax":
                logits = logits.log_softmax(-1)
            scores = logits[:, 1].cpu().tolist()  # log p(match), or the logit (vtm_score)
            vtm.update(zip([p for p, _ in part], scores))
    # re-scored first, by VTM; then the rest (unreadable ones among them) in VTC order
    ranked = sorted(vtm, key=vtm.get, reverse=True) + [p for p in order if p not in vtm]
    return [{"rank": rank, "path": index["paths"][p], "vtc": float(sim[p]), "vtm": vtm.get(p)}
            for rank, p in enumerate(ranked[:top], start=1)]


def format_results(results) -> str:
    lines = [f"{'rank':>4} {'VTM':>8} {'VTC':>7}  video"]
    for r in results:
        vtm = "-" if r["vtm"] is None else f"{r['vtm']:.3f}"
        lines.append(f"{r['rank']:>4} {vtm:>8} {r['vtc']:>7.3f}  {r['path']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", default=None, metavar="PATH",
                   help="with --search: the index to search; otherwise index the videos of a "
                        "folder (recursively), an annotation JSON or one video into --output "
                        "(default index.pt), keeping what it already holds")
    p.add_argument("--search", default=None, metavar="QUERY", help="search --index for this text")
    p.add_argument("--embed-text", default=None, metavar="FILE",
                   help="VTC features of the captions of FILE (one a line) into --output")
    p.add_argument("--checkpoint", default=None,
                   help="the model (default: the index's, or the newest */last.pt under "
                        "--checkpoints-dir)")
    p.add_argument("--checkpoints-dir", default="checkpoints")
    p.add_argument("--output", default=None, help="the index or features file; with --search, "
                                                  "the results as JSON")
    p.add_argument("--video-root", default=None,
                   help="folder an annotation's video paths are relative to")
    p.add_argument("--k", type=int, default=16,
                   help="results re-scored by VTM (0: rank by VTC alone)")
    p.add_argument("--top", type=int, default=10, help="results printed")
    p.add_argument("--visualize", default=None, metavar="DIR",
                   help="with --search: a contact sheet of the results in DIR")
    p.add_argument("--keep-rate-v", type=float, default=None, help="test-time q_v of an index")
    p.add_argument("--keep-rate-m", type=float, default=None, help="test-time q_m of an index")
    p.add_argument("--blocks", type=int, nargs=3, default=None, metavar=("K_l", "K_r", "G"))
    p.add_argument("--dense", action="store_true", help="dense attention, every token kept")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random attention blocks")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if not (args.index or args.embed_text):
        p.error("give --index VIDEOS (to index), --index INDEX.pt --search QUERY, or "
                "--embed-text FILE")
    return args


def main(argv=None):
    """`python search.py`: index videos, search an index or embed captions."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.search is not None:
            return search_command(args, device)
        checkpoint = (Path(args.checkpoint) if args.checkpoint
                      else latest_checkpoint(args.checkpoints_dir))
        model, config, _ = load_model(checkpoint, device, keep_rate_v=args.keep_rate_v,
                                      keep_rate_m=args.keep_rate_m, blocks=args.blocks,
                                      dense=args.dense)
        if args.embed_text:
            tokenizer = data.default_tokenizer(text_model_path(config.text_model))
            features = embed_texts(model, tokenizer, read_captions(args.embed_text),
                                   checkpoint=checkpoint)
            output = Path(args.output or Path(args.embed_text).with_suffix(".pt"))
        else:
            output = Path(args.output or "index.pt")
            existing = load_features(output, "video_index") if output.exists() else None
            features = index_videos(model, video_paths(args.index, args.video_root),
                                    checkpoint=checkpoint, batch_size=args.batch_size,
                                    workers=args.workers, seed=args.seed, existing=existing)
        save_features(features, output)
        print(f"wrote {output}")
        return features
    except (FileNotFoundError, ValueError) as error:  # a missing or malformed input file, named
        raise SystemExit(str(error)) from None


def search_command(args, device):
    """--search: the query against --index with the model the index was made with."""
    index = load_features(args.index, "video_index")
    recorded = index["checkpoint"]
    if not (args.checkpoint or recorded):
        raise SystemExit(f"{args.index} names no checkpoint: pass --checkpoint")
    checkpoint = Path(args.checkpoint or recorded)
    if recorded and checkpoint.resolve() != Path(recorded).resolve():
        raise SystemExit(f"{args.index} holds features of {recorded}, not of {checkpoint}")
    if (recorded and checkpoint.exists()
            and checkpoint.stat().st_mtime_ns != index["checkpoint_mtime"]):
        print(f"warning: {checkpoint} changed after {args.index} was made; run --index again")
    model, config, _ = load_model(checkpoint, device, **model_overrides(index))
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    start = time.perf_counter()
    results = search(model, index, args.search, args.k, tokenizer=tokenizer, top=args.top,
                     batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(format_results(results))
    print(f"searched {len(index['paths'])} videos in {seconds:.3f} s "
          f"(VTC, then VTM on the top {args.k})")
    result = {"query": args.search, "index": str(args.index), "checkpoint": str(checkpoint),
              "k": args.k, "seconds": seconds, "results": results}
    if args.visualize:
        sheet = Path(args.visualize) / sheet_name(args.search)
        result["picture"] = contact_sheet(results, sheet, frames=config.frames)
        print(f"wrote {result['picture']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
