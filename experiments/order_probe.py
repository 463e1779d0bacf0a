"""Diagnostic: can a video encoder learn, in a few hundred steps, what the synthetic captions say?

Trains a video encoder with a linear head per caption attribute (the first and second event's
colour, shape and direction) by cross-entropy on the synthetic train split, then prints the test
accuracy of each attribute with the frames in order and reversed. No text encoder, no contrastive
loss: the upper bound of what the encoder can give VTC in the same number of steps.

What needs order: a bag of frames knows which two colours and shapes appear but not which came
first (chance 50% once both are known), nor which way anything moved (chance 25%: a clip and its
reversal hold the same frames). Reversing the frames swaps the events and the directions, so an
encoder that reads order scores near 0 on first-event attributes of reversed clips.

    python experiments/order_probe.py                        # the tiny preset's ViT (model.py)
    python experiments/order_probe.py --encoder cnn          # a small per-frame CNN whose head sees
                                                            # every (t, h, w) feature: a reference
    python experiments/order_probe.py --set vision_layers=4 keep_rate_v=1.0 --lr 1e-3
    python experiments/order_probe.py --readout tokens --set keep_rate_v=1.0  # heads on all tokens
    python experiments/order_probe.py --head mlp             # a hidden layer of 512 first
    python experiments/order_probe.py --random-positions 0.6 # positions not split into t, h, w
    python experiments/order_probe.py --num-train 8000       # more training scenes (own folder)
    python experiments/order_probe.py --encoder text         # the text side: tiny's pretrained
                                                            # f_t, frozen, pooled as VTC pools
    python experiments/order_probe.py --checkpoint checkpoints/frames8/last.pt  # a trained model:
                                    # heads on its frozen video and text features, before and
                                    # after the VTC projection (which side holds the order?)

The text mode asks the same of the captions: is the order of events already in the pretrained text
encoder's pooled feature (a linear head on it), so that VTC's text projection could read it? A bag
of words knows both colours and both directions but not which came first (about 50% on colour 1).
"""
import argparse
import ast
import inspect
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from checkpoint import load_model  # noqa: E402
from collate import tokenize_captions  # noqa: E402
from config import preset  # noqa: E402
from model import SViTT, VideoEncoder  # noqa: E402
from pretrained import text_model_path  # noqa: E402
from synthetic import COLOURS, DIRECTIONS, SHAPES, ensure_synthetic, parse_caption  # noqa: E402

DEFAULT_TRAIN_CLIPS = inspect.signature(ensure_synthetic).parameters["num_train"].default
ATTRIBUTES = ("colour 1", "shape 1", "direction 1", "colour 2", "shape 2", "direction 2")
VALUES = (list(COLOURS), list(SHAPES), list(DIRECTIONS)) * 2


def attribute_labels(caption):
    """The six class numbers of a two-event synthetic caption, in ATTRIBUTES' order."""
    (c1, s1, d1), (c2, s2, d2) = parse_caption(caption)
    return [values.index(v) for values, v in zip(VALUES, (c1, s1, d1, c2, s2, d2))]


def decode_split(annotation, video_root):
    """Every frame of every clip, uint8 (clips, frames, H, W, 3), and their labels (clips, 6)."""
    entries = data.load_annotation(annotation)
    clips, labels = [], []
    for entry in entries:
        path = str(Path(video_root) / entry["video"])
        reader = data.open_video(path)
        clips.append(data.read_frames(reader, range(len(reader)), path))
        labels.append(attribute_labels(entry["caption"]))
    return torch.from_numpy(np.stack(clips)), torch.tensor(labels)


class FrameCNN(nn.Module):
    """Reference encoder: three stride-2 convolutions per frame, then an MLP over the features of
    every (t, h, w) cell, so position and time reach the head directly."""

    def __init__(self, frames, width=128):
        super().__init__()
        self.frames = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(),
                                    nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                    nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(7))
        self.head = nn.Sequential(nn.Linear(frames * 64 * 49, 256), nn.ReLU(),
                                  nn.Linear(256, width))

    def forward(self, video):  # (B, T, 3, S, S) -> (B, width)
        return self.head(self.frames(video.flatten(0, 1)).reshape(video.shape[0], -1))


def text_features(captions, model, tokenizer):
    """The pretrained text encoder's pooled features (captions, C) as VTC reads them, before the
    projection: f_t's output, its class token or mean (`text_pooling`)."""
    config = model.config
    features = []
    with torch.no_grad():
        for start in range(0, len(captions), 64):
            text = tokenize_captions(tokenizer, captions[start:start + 64], config.text_len)
            hidden, _ = model.encode_text(text["input_ids"], text["attention_mask"])
            features.append(model.pool(hidden, text["attention_mask"]))
    return torch.cat(features)


def run_text(args):
    """Linear heads on the frozen text features of the train split's captions; test accuracy."""
    torch.manual_seed(args.seed)
    config = preset("tiny", frames=args.frames)
    paths = ensure_synthetic()
    model = SViTT(config).eval()
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    splits = {}
    for split in ("train", "test"):
        captions = [e["caption"] for e in data.load_annotation(paths[split])]
        labels = torch.tensor([attribute_labels(c) for c in captions])
        features = text_features([data.clean_caption(c) for c in captions], model, tokenizer)
        splits[split] = (features, labels)
    accuracy = linear_heads(*splits["train"], *splits["test"], args.steps)
    print(f"\ntext ({config.text_model}, frozen, {config.text_pooling} pooling), linear heads, "
          f"{args.steps} full-batch steps on {len(splits['train'][0])} train captions: test "
          f"accuracy (%)")
    print(f"{'':>10}" + "".join(f"{a:>13}" for a in ATTRIBUTES))
    print(f"{'captions':>10}" + "".join(f"{a:>13.1f}" for a in accuracy))


def linear_heads(train_x, train_y, test_x, test_y, steps):
    """A linear head per attribute on frozen features (standardised), trained full-batch with
    AdamW; -> the test accuracy (%) of each attribute."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    sizes = [len(v) for v in VALUES]
    head = nn.Linear(train_x.shape[1], sum(sizes))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.02)
    for _ in range(steps):
        logits = head((train_x - mean) / std).split(sizes, dim=1)
        loss = sum(F.cross_entropy(z, train_y[:, j]) for j, z in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = head((test_x - mean) / std).split(sizes, dim=1)
    return [100 * (z.argmax(1) == test_y[:, j]).float().mean().item()
            for j, z in enumerate(logits)]


@torch.no_grad()
def checkpoint_features(model, config, annotation, video_root, seed):
    """A trained model's frozen features of a synthetic split, each (clips, width): the video
    summary (class token or pooler, `video_pooling`) and its VTC projection, the caption's pooled
    text feature and its projection; and the labels (clips, 6)."""
    dataset = data.VideoTextDataset(annotation, video_root, frames=config.frames,
                                    image_size=config.image_size, train=False,
                                    mean=config.image_mean, std=config.image_std)
    generator = torch.Generator().manual_seed(seed)  # the random attention blocks
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    out = {"video summary": [], "video, joint space": []}
    captions = []
    for start in range(0, len(dataset), 32):
        items = [dataset[i] for i in range(start, min(start + 32, len(dataset)))]
        _, _, summary = model.video_encoder(torch.stack([item["video"] for item in items]),
                                            generator)
        out["video summary"].append(summary)
        out["video, joint space"].append(F.normalize(model.vision_proj(summary), dim=-1))
        captions += [item["caption"] for item in items]
    out = {name: torch.cat(parts) for name, parts in out.items()}
    text = text_features([data.clean_caption(c) for c in captions], model, tokenizer)
    out["text summary"] = text
    out["text, joint space"] = F.normalize(model.text_proj(text), dim=-1)
    return out, torch.tensor([attribute_labels(c) for c in captions])


def run_checkpoint(args):
    """Linear heads on a trained checkpoint's frozen features (both sides, before and after the
    VTC projection): where in the joint space the order of events is, and where it is not."""
    model, config, run = load_model(args.checkpoint, torch.device("cpu"))
    paths = ensure_synthetic()
    if run.get("data") and Path(run["data"]).resolve() != Path(paths["train"]).resolve():
        raise SystemExit(f"{args.checkpoint} was trained on {run['data']}: the probe reads the "
                         f"synthetic captions' attributes, train it on the synthetic data")
    start = time.perf_counter()
    train_x, train_y = checkpoint_features(model, config, paths["train"], paths["video_root"],
                                           args.seed)
    test_x, test_y = checkpoint_features(model, config, paths["test"], paths["video_root"],
                                         args.seed)
    print(f"{args.checkpoint} (T={config.frames}): features of {len(train_y)} train and "
          f"{len(test_y)} test clips in {time.perf_counter() - start:.0f} s; linear heads, "
          f"{args.steps} full-batch steps: test accuracy (%)")
    print(f"{'':>20}" + "".join(f"{a:>13}" for a in ATTRIBUTES))
    for name in train_x:
        accuracy = linear_heads(train_x[name], train_y, test_x[name], test_y, args.steps)
        print(f"{name:>20}" + "".join(f"{a:>13.1f}" for a in accuracy))


def make_batch(clips, index, config, train, generator, reverse=False):
    """(B, T, 3, S, S) clips: training samples a random frame per segment, test the middle ones;
    frames resized whole (no crop), normalised as the model's config says."""
    videos = []
    for i in index.tolist():
        picked = data.sample_frame_indices(clips.shape[1], config.frames, train, generator)
        video = clips[i, picked[::-1] if reverse else picked].numpy()
        videos.append(data.transform_frames(video, image_size=config.image_size, train=False,
                                            mean=config.image_mean, std=config.image_std))
    return torch.stack(videos)


def run(args):
    if args.checkpoint:
        return run_checkpoint(args)
    if args.encoder == "text":
        return run_text(args)
    torch.manual_seed(args.seed)
    overrides = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    config = preset("tiny", frames=args.frames, **overrides)
    if args.encoder == "vit":
        vit = VideoEncoder(config)
        if args.random_positions:  # one random vector per (t, h, w): no time, row, column split
            # its own generator, so that the rest of the run draws what it draws without the flag
            draw = torch.Generator().manual_seed(1234 + args.seed)
            with torch.no_grad():
                vit.pos_embed.copy_(torch.randn(vit.pos_embed.shape, generator=draw)
                                    * args.random_positions)
        if args.readout == "tokens":  # every token's output at its place: needs no pruning
            assert config.keep_rate_v == 1.0, "--readout tokens needs --set keep_rate_v=1.0"
            encoder, width = (lambda video: vit(video)[0].flatten(1)), (
                config.num_tokens * config.vision_width)
        else:  # the clip's summary, the VTC feature (class token or mean, video_pooling)
            encoder, width = (lambda video: vit(video)[2]), config.vision_width
        modules = [vit]
    else:
        cnn = FrameCNN(args.frames)
        encoder, width, modules = cnn, 128, [cnn]
    sizes = [len(v) for v in VALUES]
    if args.head == "mlp":  # is the answer in the summary, if not linearly?
        head = nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Linear(512, sum(sizes)))
    else:
        head = nn.Linear(width, sum(sizes))
    modules.append(head)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.02)
    if args.num_train == DEFAULT_TRAIN_CLIPS:  # the data train.py makes
        paths = ensure_synthetic()
    else:  # its own folder, so that the quickstart's data stays as it is
        paths = ensure_synthetic(f"data/synthetic_{args.num_train}", num_train=args.num_train)
    start = time.perf_counter()
    train_clips, train_labels = decode_split(paths["train"], paths["video_root"])
    test_clips, test_labels = decode_split(paths["test"], paths["video_root"])
    print(f"decoded {len(train_clips)} train and {len(test_clips)} test clips in "
          f"{time.perf_counter() - start:.0f} s")
    generator = torch.Generator().manual_seed(args.seed)

    def batch(clips, index, train, reverse=False):
        return make_batch(clips, index, config, train, generator, reverse)

    start = time.perf_counter()
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / max(1, args.steps // 15))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for m in modules:
            m.train()
        index = torch.randint(len(train_clips), (args.batch_size,), generator=generator)
        logits = head(encoder(batch(train_clips, index, train=True))).split(sizes, dim=1)
        loss = sum(F.cross_entropy(z, train_labels[index, j]) for j, z in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    for m in modules:
        m.eval()
    print(f"\n{args.encoder} ({args.readout}, {args.head} head), T={args.frames}, "
          f"{args.steps} steps of {args.batch_size}, lr {args.lr}: test accuracy (%)")
    print(f"{'':>10}" + "".join(f"{a:>13}" for a in ATTRIBUTES))
    for reverse in (False, True):
        correct = torch.zeros(len(sizes))
        with torch.no_grad():
            for s in range(0, len(test_clips), 32):
                index = torch.arange(s, min(s + 32, len(test_clips)))
                logits = head(encoder(batch(test_clips, index, train=False, reverse=reverse)))
                for j, z in enumerate(logits.split(sizes, dim=1)):
                    correct[j] += (z.argmax(1) == test_labels[index, j]).sum()
        accuracy = 100 * correct / len(test_clips)
        print(f"{'reversed' if reverse else 'in order':>10}"
              + "".join(f"{a:>13.1f}" for a in accuracy.tolist()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", choices=["vit", "cnn", "text"], default="vit")
    p.add_argument("--readout", choices=["pooled", "tokens"], default="pooled",
                   help="ViT: heads on the clip's summary (the VTC feature) or on all its output "
                        "tokens in place (a linear map of the (1 + N) x d output)")
    p.add_argument("--head", choices=["linear", "mlp"], default="linear",
                   help="a linear head per attribute, or an MLP (one hidden layer of 512, GELU)")
    p.add_argument("--random-positions", type=float, default=0.0, metavar="STD",
                   help="ViT: start the position embedding as N(0, STD^2) draws instead")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=DEFAULT_TRAIN_CLIPS,
                   help="synthetic training clips (test: the default 160)")
    p.add_argument("--checkpoint", default=None,
                   help="probe a trained checkpoint's frozen features instead (video and text, "
                        "before and after the VTC projection); --steps: the heads' steps")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="tiny-preset config overrides for the ViT, e.g. vision_layers=4")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
