"""The embedded synthetic data set: scenes whose four clips differ only in time.

Written as MP4 files and annotation JSON (the format of real data), and read back through
`data.py` like real data: `python train.py` without --data makes it once and trains on it.

    paths = ensure_synthetic()   # data/synthetic/{train,test}.json and videos/, made once
    python synthetic.py --out DIR --num-train N --num-test N --seed S   # make it, show a scene

The rules:
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
    sizes). Captions are unique within each split, so each test caption has one right video (the
    train split repeats captions, in new scenes, only when it asks for more than 4320 - test).
  - Sizes: whole scenes of 4 clips; 1600 train and 160 test clips of 16 frames, 112 px, 8 fps.
  - Layout: ROOT/train.json, ROOT/test.json, ROOT/videos/{train,test}/SSSSS_K.mp4 (scene S, clip
    K: 0 the clip, 1 its reversal, 2 the events swapped, 3 that reversed), and ROOT/manifest.json,
    written last, holding the parameters: a later call with the same parameters reuses the files,
    other parameters regenerate them. Each entry carries the "group" of its scene ("train/00012"),
    which training batches whole and `eval.py` scores as group accuracy.
"""
import argparse
import itertools
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass

import av
import numpy as np
import torch

import data
import downstream_data

logger = logging.getLogger(__name__)

SYNTHETIC_VERSION = 2   # bump when the generator changes, so old files are regenerated
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
    def direction(self):
        dy, dx = self.end[0] - self.start[0], self.end[1] - self.start[1]
        return next(name for name, (uy, ux) in DIRECTIONS.items()
                    if (uy, ux) == (int(np.sign(dy)), int(np.sign(dx))))

    def text(self):
        return f"a {self.colour} {self.shape} moves {self.direction}"


def synthetic_caption(events):
    """'a red square moves up, then a blue circle moves left': the events in time order."""
    return ", then ".join(event.text() for event in events)


def reverse_events(events):
    """The events of the time-reversed clip: the other order, each from its end to its start."""
    return tuple(Event(e.colour, e.shape, e.end, e.start) for e in reversed(events))


def scene_clips(events):
    """The four clips of a scene: the clip, its reversal, the events swapped, that reversed."""
    swapped = (events[1], events[0])
    return [events, reverse_events(events), swapped, reverse_events(swapped)]


def synthetic_geometry(size, num_frames):
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


def shape_mask(shape, size):
    """Boolean (size, size) mask of a square, a circle or an upward triangle."""
    y, x = np.mgrid[0:size, 0:size] + 0.5                                          # (s, s)
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (y - size / 2) ** 2 + (x - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        return np.abs(x - size / 2) <= y / 2
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(background, events, *, num_frames, object_size):
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


def smooth_noise(rng, size, channels, grid=5):
    """(size, size, channels) noise of unit scale, bilinearly upsampled from (grid, grid, C)."""
    coarse = rng.normal(size=(grid, grid, channels))
    coords = np.linspace(0, grid - 1, size)
    low = np.minimum(coords.astype(int), grid - 2)
    frac = (coords - low)[:, None]                                                 # (S, 1)
    rows = coarse[low] * (1 - frac[..., None]) + coarse[low + 1] * frac[..., None]  # (S, grid, C)
    return rows[:, low] * (1 - frac[None]) + rows[:, low + 1] * frac[None]         # (S, S, C)


def make_background(rng, size):
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


def make_scene(rng, attributes, *, size, num_frames):
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


def synthetic_caption_groups(same_colour=False):
    """One attribute pair per group of four captions that a scene's clips carry, in fixed order.

    A caption is ((colour, shape, direction), (colour, shape, direction)) with two colours (with
    same_colour: one colour and two shapes, the retrieval fine-tuning split); its group holds its
    reversal, its swap and the swap's reversal (see scene_clips).
    """
    def flip(event):
        return (event[0], event[1], OPPOSITE[event[2]])

    events = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    groups = []
    for first, second in itertools.product(events, events):
        if (first[0] == second[0]) != same_colour or (same_colour and first[1] == second[1]):
            continue
        group = {(first, second), (flip(second), flip(first)), (second, first),
                 (flip(first), flip(second))}
        if (first, second) == min(group):
            groups.append((first, second))
    return groups


def plan_synthetic(seed, train_scenes, test_scenes, same_colour=False):
    """Attribute pairs of each split's scenes: test groups first, then train groups (no overlap)."""
    groups = synthetic_caption_groups(same_colour)
    assert test_scenes < len(groups), f"at most {len(groups) - 1} test scenes"
    order = np.random.default_rng(seed).permutation(len(groups))
    rest = order[test_scenes:]
    if train_scenes > len(rest):
        logger.info("%d train scenes > %d unused caption groups: training captions repeat",
                    train_scenes, len(rest))
    return {"test": [groups[i] for i in order[:test_scenes]],
            "train": [groups[rest[i % len(rest)]] for i in range(train_scenes)]}


def write_mp4(path, frames, *, fps):
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


def write_scene(job):
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
        entries.append({"video": video, "caption": synthetic_caption(clip),
                        "group": f"{split}/{scene:05d}"})
    return entries


def _synthetic_ready(root, params):
    """Whether ROOT holds a complete dataset made with `params`."""
    try:
        with open(os.path.join(root, "manifest.json")) as file:
            if json.load(file) != params:
                return False
        return all(os.path.isfile(os.path.join(root, "videos", entry["video"]))
                   for split in ("train", "test")
                   for entry in data.load_annotation(os.path.join(root, f"{split}.json")))
    except (OSError, ValueError):
        return False


def generate_synthetic(root, params, workers):
    """Write every clip, both annotations, then the manifest (last, so that it marks completion)."""
    manifest = os.path.join(root, "manifest.json")
    if os.path.exists(manifest):
        os.remove(manifest)
    video_root = os.path.join(root, "videos")
    plan = plan_synthetic(params["seed"], -(-params["num_train"] // 4), -(-params["num_test"] // 4),
                          params.get("same_colour", False))
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


def ensure_synthetic(root="data/synthetic", *, seed=0, num_train=1600,
                     num_test=160, num_frames=16, size=112,
                     force=False, workers=2, same_colour=False):
    """Make the synthetic dataset under ROOT if it is not there with these parameters.

    Returns {"train": annotation path, "test": annotation path, "video_root": folder}. Processes
    that call it at once (DDP ranks) wait on a lock file, so one of them generates.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    params = {"version": SYNTHETIC_VERSION, "seed": seed, "num_train": num_train,
              "num_test": num_test, "num_frames": num_frames, "size": size, "fps": 8}
    if same_colour:
        params["same_colour"] = True
    with open(os.path.join(root, ".lock"), "w") as lock:
        if sys.platform != "win32":
            import fcntl  # Unix only; the lock guards several ranks of one machine
            fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not _synthetic_ready(root, params):
            start = time.perf_counter()
            logger.info("generating the synthetic dataset in %s", root)
            generate_synthetic(root, params, workers)
            logger.info("generated in %.1f s", time.perf_counter() - start)
    return {"train": os.path.join(root, "train.json"), "test": os.path.join(root, "test.json"),
            "video_root": os.path.join(root, "videos")}


CLIP_NAME = re.compile(r"(.*?)(\d+)_([0-3])\.mp4")
# what a caption's clip K must beat in each comparison: clip K ^ 1 is its reversal (the same
# frames), K ^ 2 its events swapped (the same words), K ^ 3 both
RIVALS = {"reversal": 1, "swapped": 2, "swapped_reversed": 3}


def scene_rivals(videos, groups):
    """For the synthetic layout (videos named SSSSS_K.mp4, four clips K = 0-3 a scene, each with its
    scene's `group`): for each kind of RIVALS, each video's rival in its scene as a LongTensor
    (videos,), -1 where there is none (a missing clip, or one outside the video's group). {} when
    no video has a rival (real data).

    Why these comparisons: a bag-of-frames video encoder tells clip 0 from clip 2 (other frames)
    but not from clip 1 (the same frames reversed); a bag-of-words text encoder tells caption 0
    from caption 1 (other direction words, unless the two motions are opposite) but not from
    caption 2 (the same words, events swapped). The two blind sides split a scene along different
    lines, so together they are at chance on all four clips (25%) and on every pair (50%).
    Beating the reversal needs order in the video encoder, beating the swapped events order in
    the text encoder; a model with one side reading order reaches about 50% group accuracy."""
    index = {}
    for i, video in enumerate(videos):
        match = CLIP_NAME.fullmatch(str(video).replace(os.sep, "/"))
        if match:
            index[(match.group(1), match.group(2), int(match.group(3)))] = i
    rivals = {}
    for name, flip in RIVALS.items():
        rival = torch.full((len(videos),), -1, dtype=torch.long)
        for (folder, scene, k), i in index.items():
            j = index.get((folder, scene, k ^ flip), -1)
            if j >= 0 and groups[i] is not None and groups[i] == groups[j]:
                rival[i] = j
        rivals[name] = rival
    return rivals if any((rival >= 0).any() for rival in rivals.values()) else {}


# ---------------------------------------------------------------------------------------------
# Downstream splits: video QA on the pre-training clips, and a retrieval fine-tuning split
# ---------------------------------------------------------------------------------------------

QA_VERSION = 1
EVENT_TEXT = re.compile(r"a (\w+) (\w+) moves (\w+)")


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
    """(colour, shape, direction) of each event of a synthetic caption, in time order."""
    events = [EVENT_TEXT.fullmatch(part) for part in re.split(r",? then ", caption.strip())]
    assert all(events), f"not a synthetic caption: {caption!r}"
    return [event.groups() for event in events]


def clip_questions(caption: str) -> list[dict]:
    """The questions of a two-event clip, each needing the order of the frames:

    - "first": which object moves first (the reversed or swapped clip answers the other object);
    - "direction": which way an object moves (the reversal answers the opposite way);
    - "after": what moves after an object ("nothing" after the second one).
    """
    (c1, s1, d1), (c2, s2, d2) = parse_caption(caption)
    first, second = f"{c1} {s1}", f"{c2} {s2}"
    return [
        {"type": "first", "question": "which object moves first", "answer": first},
        {"type": "direction", "question": f"which way does the {first} move", "answer": d1},
        {"type": "direction", "question": f"which way does the {second} move", "answer": d2},
        {"type": "after", "question": f"what moves after the {first}", "answer": second},
        {"type": "after", "question": f"what moves after the {second}", "answer": "nothing"},
    ]


def synthetic_answer_list() -> list[str]:
    """Every answer a synthetic question can have: the objects, the directions, "nothing"."""
    objects = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    return objects + list(DIRECTIONS) + ["nothing"]


def make_synthetic_qa(entries: list[dict], *, seed: int, per_clip: int | None) -> list[dict]:
    """QA entries of a split's clips: all five questions of each clip, or `per_clip` of them
    drawn with the seed (one "first" question always among them)."""
    rng = np.random.default_rng(seed)
    qa = []
    for entry in entries:
        questions = clip_questions(entry["caption"])
        if per_clip is not None:
            chosen = [0, *sorted(1 + rng.choice(4, size=per_clip - 1, replace=False))]
            questions = [questions[i] for i in chosen]
        for question in questions:
            qa.append({"video": entry["video"], "question": question["question"],
                       "answer": question["answer"], "type": question["type"],
                       "question_id": len(qa)})
    return qa


def ensure_synthetic_qa(root="data/synthetic", *, seed: int = 0, train_per_clip: int = 3,
                        **kwargs) -> dict:
    """The synthetic QA set on the pre-training clips (made with ensure_synthetic(root, seed,
    **kwargs) if needed): ROOT/qa_train.json (train_per_clip questions a clip), qa_test.json (all
    five), qa_answers.json. Returns {"train", "test", "video_root", "answer_list"}."""
    paths = ensure_synthetic(root, seed=seed, **kwargs)
    root = os.fspath(root)
    out = {split: os.path.join(root, f"qa_{split}.json") for split in ("train", "test")}
    out["answer_list"] = os.path.join(root, "qa_answers.json")
    manifest = os.path.join(root, "qa_manifest.json")
    with open(os.path.join(root, "manifest.json")) as file:
        params = {"version": QA_VERSION, "seed": seed, "train_per_clip": train_per_clip,
                  "clips": json.load(file)}
    try:
        with open(manifest) as file:
            ready = json.load(file) == params and all(map(os.path.isfile, out.values()))
    except (OSError, ValueError):
        ready = False
    if not ready:
        for split, per_clip in (("train", train_per_clip), ("test", None)):
            entries = data.load_annotation(paths[split])
            with open(out[split], "w") as file:
                json.dump(make_synthetic_qa(entries, seed=seed, per_clip=per_clip), file, indent=0)
        with open(out["answer_list"], "w") as file:
            json.dump(synthetic_answer_list(), file)
        with open(manifest, "w") as file:
            json.dump(params, file)
    return {**out, "video_root": paths["video_root"]}


def ensure_synthetic_retrieval(root="data/synthetic_finetune", *, seed: int = 1,
                               num_train: int = 400, num_test: int = 80, **kwargs) -> dict:
    """The retrieval fine-tuning split: scenes whose two objects share their colour and differ in
    shape ("a red square moves up, then a red circle moves left"), a pairing pre-training never
    shows, so telling the four clips of a scene apart needs shape, not colour, bound to each
    event. Same layout and reader as the pre-training data (ensure_synthetic)."""
    return ensure_synthetic(root, seed=seed, num_train=num_train, num_test=num_test,
                            same_colour=True, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/synthetic", help="data set folder")
    parser.add_argument("--num-train", type=int, default=1600, help="train clips")
    parser.add_argument("--num-test", type=int, default=160, help="test clips")
    parser.add_argument("--seed", type=int, default=0, help="data set seed")
    parser.add_argument("--force", action="store_true", help="make it again even if it is there")
    parser.add_argument("--workers", type=int, default=2, help="processes that write the clips")
    parser.add_argument("--finetune-split", action="store_true",
                        help="also make the retrieval fine-tuning split (data/synthetic_finetune)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    paths = ensure_synthetic(args.out, seed=args.seed, num_train=args.num_train,
                             num_test=args.num_test, force=args.force, workers=args.workers)
    print(f"ready in {time.perf_counter() - start:.1f} s: {', '.join(paths.values())}\nthe four "
          "clips of the first test scene, as the loader reads them:")
    data.demo(paths["test"], paths["video_root"])
    qa = ensure_synthetic_qa(args.out, seed=args.seed, num_train=args.num_train,
                             num_test=args.num_test)
    load = downstream_data.load_qa_annotation
    baseline = downstream_data.majority_baseline(load(qa["train"]), load(qa["test"]))
    print(f"QA: {qa['train']}, {qa['test']}, answers {qa['answer_list']}; the most frequent "
          f"answer of each question type scores {baseline['overall']:.1f}% on the test questions ("
          + ", ".join(f"{kind} {acc:.1f}%" for kind, acc in baseline["per_type"].items()) + ")")
    if args.finetune_split:
        split = ensure_synthetic_retrieval(workers=args.workers)
        print(f"retrieval fine-tuning split: {split['train']}, {split['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
