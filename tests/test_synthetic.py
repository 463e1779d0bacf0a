"""Tests of the synthetic data set: captions, motion, time reversal, files, and reading it back."""
import json

import decord
import numpy as np
import pytest
import torch
import transformers

import collate
import data
import synthetic

TINY = dict(num_train=8, num_test=8, num_frames=8, size=64, workers=1)


@pytest.fixture(scope="module")
def tokenizer():
    """A BERT WordPiece tokenizer over the synthetic captions' words, built in memory."""
    words = ["a", "moves", "then", *synthetic.COLOURS, *synthetic.SHAPES, *synthetic.DIRECTIONS]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return transformers.BertTokenizer(vocab={word: i for i, word in enumerate(specials + words)})


def test_caption_groups_cover_every_caption_once():
    groups = synthetic.synthetic_caption_groups()
    assert len(groups) == 6 * 3 * 4 * 5 * 3 * 4 // 4
    captions = set()
    rng = np.random.default_rng(0)
    for attributes in groups:
        _, events = synthetic.make_scene(rng, attributes, size=112, num_frames=16)
        clips = synthetic.scene_clips(events)
        clip_captions = {synthetic.synthetic_caption(clip) for clip in clips}
        assert len(clip_captions) == 4 and not clip_captions & captions
        captions |= clip_captions
    assert len(captions) == 4320


def test_reversed_clip_is_the_clip_backwards():
    rng = np.random.default_rng(1)
    background, events = synthetic.make_scene(rng, (("red", "square", "up"), ("blue", "circle",
                                                                              "left")),
                                         size=112, num_frames=16)
    object_size, _ = synthetic.synthetic_geometry(112, 16)
    forward = synthetic.render_clip(background, events, num_frames=16, object_size=object_size)
    backward = synthetic.render_clip(background, synthetic.reverse_events(events), num_frames=16,
                                object_size=object_size)
    assert np.array_equal(backward, forward[::-1])
    assert not np.array_equal(forward, forward[::-1])
    assert synthetic.synthetic_caption(events) == \
        "a red square moves up, then a blue circle moves left"
    assert synthetic.synthetic_caption(synthetic.reverse_events(events)) == \
        "a blue circle moves right, then a red square moves down"


@pytest.mark.parametrize("seed", range(4))
def test_objects_move_as_their_caption_says(seed):
    rng = np.random.default_rng(seed)
    groups = synthetic.synthetic_caption_groups()
    background, events = synthetic.make_scene(rng, groups[seed * 97], size=112, num_frames=16)
    object_size, _ = synthetic.synthetic_geometry(112, 16)
    for clip in synthetic.scene_clips(events):
        frames = synthetic.render_clip(background, clip, num_frames=16, object_size=object_size)
        words = synthetic.synthetic_caption(clip).replace(",", "").split()
        # "a C S moves D then a C S moves D": event k has colour words[1 + 6k], direction [4 + 6k]
        for k in range(2):
            colour, direction = words[1 + 6 * k], words[4 + 6 * k]
            mask = np.all(frames == synthetic.COLOURS[colour], axis=-1)                 # (F, S, S)
            first, last = (0, 7) if k == 0 else (8, 15)
            (y0, x0), (y1, x1) = (np.argwhere(mask[t]).mean(0) for t in (first, last))
            dy, dx = synthetic.DIRECTIONS[direction]
            assert (y1 - y0) * dy > 30 or (x1 - x0) * dx > 30
            other = (8, 15) if k == 0 else (0, 7)   # still while the other object moves
            assert np.array_equal(np.argwhere(mask[other[0]]), np.argwhere(mask[other[1]]))


def test_synthetic_is_deterministic_readable_and_split_cleanly(tmp_path):
    first = synthetic.ensure_synthetic(tmp_path / "a", seed=5, **TINY)
    second = synthetic.ensure_synthetic(tmp_path / "b", seed=5, **TINY)
    other = synthetic.ensure_synthetic(tmp_path / "c", seed=6, **TINY)
    train = data.load_annotation(first["train"])
    test = data.load_annotation(first["test"])
    assert len(train) == 8 and len(test) == 8
    assert train == data.load_annotation(second["train"])
    assert test != data.load_annotation(other["test"])
    for entry in train + test:
        a = (tmp_path / "a" / "videos" / entry["video"]).read_bytes()
        assert a == (tmp_path / "b" / "videos" / entry["video"]).read_bytes()
        reader = decord.VideoReader(str(tmp_path / "a" / "videos" / entry["video"]))
        assert len(reader) == 8 and reader[0].shape == (64, 64, 3)
    test_captions = [entry["caption"] for entry in test]
    assert len(set(test_captions)) == len(test_captions)
    assert not set(test_captions) & {entry["caption"] for entry in train}
    # decoded: clip 1 of a scene is clip 0 backwards, up to the codec's error
    clips = [decord.VideoReader(str(tmp_path / "a" / "videos" / f"test/00000_{k}.mp4"))
             .get_batch(list(range(8))).asnumpy().astype(float) for k in range(2)]
    backwards = np.abs(clips[1] - clips[0][::-1]).mean(axis=(1, 2, 3))               # (F,)
    forwards = np.abs(clips[1] - clips[0]).mean(axis=(1, 2, 3))                     # (F,)
    assert backwards.max() < 4 and forwards[0] > 3 * backwards.max()


def test_synthetic_is_made_once_and_remade_when_parameters_change(tmp_path):
    paths = synthetic.ensure_synthetic(tmp_path, seed=0, **TINY)
    manifest = tmp_path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert synthetic.ensure_synthetic(tmp_path, seed=0, **TINY) == paths
    assert manifest.stat().st_mtime_ns == stamp
    (tmp_path / "videos" / "test" / "00001_2.mp4").unlink()       # incomplete: made again
    synthetic.ensure_synthetic(tmp_path, seed=0, **TINY)
    assert (tmp_path / "videos" / "test" / "00001_2.mp4").exists()
    synthetic.ensure_synthetic(tmp_path, seed=0, **{**TINY, "num_train": 12})
    assert len(data.load_annotation(paths["train"])) == 12
    assert json.loads(manifest.read_text())["num_train"] == 12


def test_synthetic_split_loads_through_the_dataset(tmp_path, tokenizer):
    paths = synthetic.ensure_synthetic(tmp_path, seed=0, **TINY)
    dataset = data.VideoTextDataset(paths["test"], paths["video_root"], frames=4, image_size=32,
                                    train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4,
                                         collate_fn=collate.make_collate(tokenizer))
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 4, 3, 32, 32)
    assert batch["skipped"] == [] and batch["video_id"].tolist() == [0, 1, 2, 3]
    assert torch.isfinite(batch["video"]).all()


def test_scene_rivals_pair_each_clip_with_its_reversal_and_its_swapped_events():
    groups = synthetic.synthetic_caption_groups()[:60]
    rng = np.random.default_rng(2)
    names, captions, events_of = [], [], []
    for g, attributes in enumerate(groups):
        _, events = synthetic.make_scene(rng, attributes, size=112, num_frames=16)
        for k, clip in enumerate(synthetic.scene_clips(events)):
            names.append(f"train/{g:05d}_{k}.mp4")
            captions.append(synthetic.synthetic_caption(clip))
            events_of.append(clip)
    names.append("train/99999_0.mp4")                        # a scene without its other clips
    groups = [f"train/{name[6:11]}" for name in names]
    rivals = synthetic.scene_rivals(names, groups)
    assert set(rivals) == {"reversal", "swapped", "swapped_reversed"}
    assert all(rival[-1] == -1 for rival in rivals.values())
    bag = [sorted(c.replace(",", "").split()) for c in captions]
    same_bag_as_reversal = 0
    for i in range(len(captions)):
        reversal, swapped = rivals["reversal"][i].item(), rivals["swapped"][i].item()
        both = rivals["swapped_reversed"][i].item()
        assert names[reversal][:-5] == names[i][:-5] and len({i, reversal, swapped, both}) == 4
        # the reversal plays the same frames backwards: its caption is the events reversed
        assert captions[reversal] == synthetic.synthetic_caption(
            synthetic.reverse_events(events_of[i]))
        assert rivals["reversal"][swapped] == both
        # the swapped events hold the same words: a bag-of-words text encoder cannot tell them
        assert bag[swapped] == bag[i] and captions[swapped] != captions[i]
        same_bag_as_reversal += bag[reversal] == bag[i]   # only when the two directions oppose
    assert 0 < same_bag_as_reversal < len(captions) / 2
    assert synthetic.scene_rivals(["clips/cooking.mp4", "clips/dog_2.avi"], ["a", "a"]) == {}
    # names that look like the layout count only inside one group (real data has none)
    lookalike = ["cam/0001_0.mp4", "cam/0001_1.mp4"]
    assert synthetic.scene_rivals(lookalike, [None, None]) == {}
    assert synthetic.scene_rivals(lookalike, ["x", "x"])["reversal"].tolist() == [1, 0]
