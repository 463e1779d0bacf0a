"""Tests for data.py: frame sampling, decoding and transforms, captions, bad input.

Videos are small MP4s written with PyAV into tmp_path, so nothing is downloaded.
"""

import json
import logging
import pickle

import av
import numpy as np
import pytest
import torch

import data
import synthetic

COLOUR_RGB = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 230)}


def write_clip(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_mp4(str(path), frames, fps=8)


def constant_clip(rgb, num_frames=12, size=32):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (num_frames, size, size, 3)).copy()


def ramp_clip(num_frames=12, size=32):
    """Frame i is uniform grey 20 + 18 i, so a decoded frame tells its index."""
    levels = 20 + 18 * np.arange(num_frames)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, size, size,
                                                         3)).astype(np.uint8)


def unnormalise(video):
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    return video * std + mean                                                     # (T, 3, S, S)


@pytest.fixture()
def colour_set(tmp_path):
    """Three readable clips whose caption names their colour, and four unreadable files."""
    root = tmp_path / "videos"
    for name, rgb in COLOUR_RGB.items():
        write_clip(root / f"{name}.mp4", constant_clip(rgb))
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n")
    valid = (root / "red.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(valid[: len(valid) // 2])
    with av.open(str(root / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    entries = [{"video": f"{name}.mp4", "caption": f"a {name} video"} for name in COLOUR_RGB]
    bad = ["missing.mp4", "empty.mp4", "text.mp4", "truncated.mp4", "audio.mp4"]
    entries += [{"video": video, "caption": "a video of the sky"} for video in bad]
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps(entries))
    return annotation, root, bad


# --- frame sampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_frames,frames", [(16, 4), (17, 4), (100, 8), (8, 8), (30, 16)])
def test_train_indices_fall_in_their_segment_and_cover_it(num_frames, frames):
    generator = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(frames)]
    for _ in range(300):
        indices = data.sample_frame_indices(num_frames, frames, True, generator=generator)
        assert len(indices) == frames
        for segment, index in enumerate(indices):
            assert segment * num_frames // frames <= index < (segment + 1) * num_frames // frames
            seen[segment].add(index)
    for segment in range(frames):   # every frame of a segment gets drawn
        lo, hi = segment * num_frames // frames, (segment + 1) * num_frames // frames
        assert seen[segment] == set(range(lo, hi))


@pytest.mark.parametrize("num_frames,frames,expected", [
    (16, 4, [1, 5, 9, 13]),
    (17, 4, [1, 5, 9, 14]),     # segments [0,4) [4,8) [8,12) [12,17)
    (12, 3, [1, 5, 9]),
    (9, 1, [4]),
    (8, 8, list(range(8))),
])
def test_test_indices_are_segment_middles(num_frames, frames, expected):
    assert data.sample_frame_indices(num_frames, frames, False) == expected


@pytest.mark.parametrize("train", [True, False])
def test_short_clip_repeats_its_last_frame(train):
    assert data.sample_frame_indices(3, 8, train) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert data.sample_frame_indices(1, 4, train) == [0, 0, 0, 0]


def test_clip_without_frames_is_refused():
    with pytest.raises(ValueError):
        data.sample_frame_indices(0, 4, False)


# --- transforms and decoding -------------------------------------------------------------------

def test_random_resized_crop_box_respects_scale_ratio_and_bounds():
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        top, left, h, w = data.random_resized_crop_box(90, 160, (0.5, 1.0), generator=generator)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160
        assert 0.5 * 0.97 <= h * w / (90 * 160) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_training_crop_is_shared_by_all_frames():
    gradient = np.linspace(0, 255, 64, dtype=np.float32)
    image = np.stack([*np.meshgrid(gradient, gradient[::-1]), np.full((64, 64), 128.0)], -1)
    frames = np.repeat(image[None].astype(np.uint8), 4, axis=0)                    # (4, 64, 64, 3)
    generator = torch.Generator().manual_seed(0)
    crops = [data.transform_frames(frames, image_size=32, train=True, generator=generator)
             for _ in range(4)]
    for video in crops:
        assert torch.equal(video[0], video[3])       # one crop for the clip ...
    assert not torch.allclose(crops[0], crops[1])    # ... a new one for each clip


def test_eval_item_decodes_middle_frames_with_normalised_values(tmp_path):
    write_clip(tmp_path / "ramp.mp4", ramp_clip(num_frames=12))
    annotation = [{"video": "ramp.mp4", "caption": "Ramp!"}]
    dataset = data.VideoTextDataset(annotation, tmp_path, frames=4, image_size=24, train=False)
    item = dataset[0]
    video = item["video"]
    assert video.shape == (4, 3, 24, 24) and video.dtype == torch.float32
    assert item["caption"] == "ramp" and item["video_id"] == 0 and item["skipped"] == []
    assert item["path"] == str(tmp_path / "ramp.mp4")
    grey = unnormalise(video).mean(dim=(1, 2, 3)) * 255                            # (T,)
    expected = 20 + 18 * torch.tensor([1.0, 4.0, 7.0, 10.0])   # middles of [0,3) [3,6) [6,9) [9,12)
    assert torch.allclose(grey, expected, atol=4)


def test_normalisation_uses_imagenet_statistics(tmp_path):
    write_clip(tmp_path / "blue.mp4", constant_clip(COLOUR_RGB["blue"]))
    annotation = [{"video": "blue.mp4", "caption": "blue"}]
    for train in (True, False):
        dataset = data.VideoTextDataset(annotation, tmp_path, frames=3, image_size=16, train=train)
        video = dataset[0]["video"]
        low = (0 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
        high = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
        assert torch.all(video >= low.view(1, 3, 1, 1) - 1e-5)
        assert torch.all(video <= high.view(1, 3, 1, 1) + 1e-5)
        rgb = unnormalise(video).mean(dim=(0, 2, 3)) * 255                        # (3,)
        assert torch.allclose(rgb, torch.tensor(COLOUR_RGB["blue"], dtype=torch.float), atol=8)


def test_base_transform_matches_beit_image_processor():
    """The base preset normalises as transformers' BeitImageProcessor does at its defaults (the
    BEiT checkpoint's preprocessing): frames already at 224 px, so resize and crop keep them."""
    from transformers import BeitImageProcessor

    from model import preset
    config = preset("base")
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    ours = data.transform_frames(frames, image_size=config.image_size, train=False,
                                 mean=config.image_mean, std=config.image_std)
    processor = BeitImageProcessor()
    theirs = torch.stack([torch.as_tensor(np.asarray(processor(image, return_tensors="np")
                                                     ["pixel_values"][0])) for image in frames])
    assert ours.shape == theirs.shape == (3, 3, 224, 224)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_training_on_whole_frames_when_crop_scale_starts_at_one():
    """crop_scale (1, 1): a training clip is the whole frame resized, exactly as at test time,
    while the default scale crops (the synthetic captions describe whole frames)."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    test = data.transform_frames(frames, image_size=32, train=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        whole = data.transform_frames(frames, image_size=32, train=True, crop_scale=(1.0, 1.0),
                                      generator=generator)
        assert torch.equal(whole, test)
    cropped = data.transform_frames(frames, image_size=32, train=True, generator=generator)
    assert not torch.allclose(cropped, test)


def test_flip_mirrors_whole_clips_only_when_asked():
    gradient = np.linspace(0, 255, 32, dtype=np.float32)
    image = np.stack([np.tile(gradient, (32, 1))] * 3, -1).astype(np.uint8)      # left to right
    frames = np.repeat(image[None], 2, axis=0)
    whole = dict(image_size=32, train=True, crop_scale=(1.0, 1.0))

    def direction(video):  # +1: brighter to the right
        return float(torch.sign(video[..., -1].mean() - video[..., 0].mean()))

    for flip, expected in ((False, {1.0}), (True, {1.0, -1.0})):
        generator = torch.Generator().manual_seed(0)
        clips = [data.transform_frames(frames, flip=flip, generator=generator, **whole)
                 for _ in range(16)]
        assert {direction(video) for video in clips} == expected
        assert all(torch.equal(video[0], video[1]) for video in clips)  # one flip per clip


def test_short_video_item_repeats_last_frame(tmp_path):
    write_clip(tmp_path / "short.mp4", ramp_clip(num_frames=3))
    annotation = [{"video": "short.mp4", "caption": "short"}]
    dataset = data.VideoTextDataset(annotation, tmp_path, frames=6, image_size=16, train=True)
    grey = unnormalise(dataset[0]["video"]).mean(dim=(1, 2, 3)) * 255              # (T,)
    expected = 20 + 18 * torch.tensor([0.0, 1, 2, 2, 2, 2])
    assert torch.allclose(grey, expected, atol=4)


# --- annotations ---------------------------------------------------------------------------------

def test_several_captions_share_a_video_id(tmp_path):
    write_clip(tmp_path / "a.mp4", constant_clip(COLOUR_RGB["red"]))
    write_clip(tmp_path / "b.mp4", constant_clip(COLOUR_RGB["green"]))
    annotation = [{"video": "a.mp4", "caption": ["A red video.", "Red, again"]},
                  {"video": "b.mp4", "caption": "a green video"},
                  {"video": "a.mp4", "caption": "red video three"}]
    train = data.VideoTextDataset(annotation, tmp_path, frames=2, image_size=16, train=True)
    assert len(train) == 4 and train.videos == ["a.mp4", "b.mp4"]
    assert [train[i]["video_id"] for i in range(4)] == [0, 0, 1, 0]
    assert [train[i]["caption"] for i in range(4)] == ["a red video", "red again",
                                                       "a green video", "red video three"]
    test = data.VideoTextDataset(annotation, tmp_path, frames=2, image_size=16, train=False)
    assert len(test) == 2
    assert [test[i]["caption"] for i in range(2)] == ["a red video", "a green video"]
    assert test.captions == [("a red video", 0), ("red again", 0), ("a green video", 1),
                             ("red video three", 0)]


@pytest.mark.parametrize("content,message", [
    ("{not json", "not a JSON file"),
    ('{"video": "a.mp4", "caption": "x"}', "expected a JSON list"),
    ("[]", "no entries"),
    ('[{"video": "a.mp4", "caption": "x"}, {"caption": "y"}]', "entry 1 {\"caption\": \"y\"}"),
    ('[{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4"}]', "entry 1"),
    ('[{"video": "a.mp4", "caption": []}]', "entry 0"),
    ('[{"video": "a.mp4", "caption": ["x", 3]}]', "entry 0"),
    ('["a.mp4"]', "entry 0 \"a.mp4\""),
])
def test_malformed_annotation_names_file_and_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(data.AnnotationError) as error:
        data.load_annotation(path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_missing_annotation_file_is_an_annotation_error(tmp_path):
    with pytest.raises(data.AnnotationError, match="not found"):
        data.load_annotation(tmp_path / "nowhere.json")


# --- unreadable videos ---------------------------------------------------------------------------

def test_training_replaces_unreadable_clips_with_whole_pairs(colour_set, caplog):
    annotation, root, bad = colour_set
    dataset = data.VideoTextDataset(annotation, root, frames=2, image_size=16, train=True)
    caplog.set_level(logging.WARNING, logger="data")
    for index, video in enumerate(bad, start=len(COLOUR_RGB)):
        for _ in range(2):   # a second read of the same bad item logs nothing new
            item = dataset[index]
            assert item["skipped"][0] == str(root / video)
            assert all(path.endswith(tuple(bad)) for path in item["skipped"])
            colour = item["caption"].split()[1]                 # "a red video" -> red
            assert item["path"] == str(root / f"{colour}.mp4")
            assert dataset.videos[item["video_id"]] == f"{colour}.mp4"
            rgb = unnormalise(item["video"]).mean(dim=(0, 2, 3)) * 255
            assert torch.allclose(rgb, torch.tensor(COLOUR_RGB[colour], dtype=torch.float),
                                  atol=10)
    warned = [record.getMessage() for record in caplog.records]
    for video in bad:
        assert sum(str(root / video) in message for message in warned) == 1
    assert dataset[0]["skipped"] == []


def test_replacement_is_deterministic_from_seed(colour_set):
    annotation, root, bad = colour_set
    first = data.VideoTextDataset(annotation, root, frames=2, image_size=16, train=True, seed=3)
    again = data.VideoTextDataset(annotation, root, frames=2, image_size=16, train=True, seed=3)
    picks = [first[i]["path"] for i in range(len(first))]
    assert picks == [again[i]["path"] for i in range(len(again))]
    assert first.replacement_index(5, 0) != 5


@pytest.mark.parametrize("video", ["missing.mp4", "empty.mp4", "text.mp4", "truncated.mp4",
                                   "audio.mp4"])
def test_eval_raises_naming_the_unreadable_file(colour_set, video):
    annotation, root, bad = colour_set
    dataset = data.VideoTextDataset(annotation, root, frames=2, image_size=16, train=False)
    with pytest.raises(data.VideoReadError) as error:
        dataset[dataset.videos.index(video)]
    assert str(root / video) in str(error.value) and error.value.path == str(root / video)
    assert str(pickle.loads(pickle.dumps(error.value))) == str(error.value)   # crosses processes


def test_all_unreadable_training_set_stops_with_the_files(colour_set):
    annotation, root, bad = colour_set
    entries = [{"video": video, "caption": "nothing"} for video in bad]
    dataset = data.VideoTextDataset(entries, root, frames=2, image_size=16, train=True)
    with pytest.raises(data.VideoReadError, match="all unreadable") as error:
        dataset[0]
    assert str(root / "missing.mp4") in str(error.value)


def test_check_lists_bad_videos_and_exits_nonzero(colour_set, capsys, tmp_path):
    annotation, root, bad = colour_set
    assert data.main(["--check", str(annotation), str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and str(root / "missing.mp4") in out
    for video in bad[1:]:
        assert f"UNREADABLE                 {root / video}" in out
    assert "12 frames" in out and "3 readable, 1 missing, 4 unreadable" in out
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"video": "red.mp4", "caption": "red"}]))
    assert data.main(["--check", str(good), str(root)]) == 0
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    assert data.main(["--check", str(broken), str(root)]) == 2
    assert str(broken) in capsys.readouterr().err


# --- captions ------------------------------------------------------------------------------------

def test_clean_caption():
    assert data.clean_caption("  A Red-Square,  moves LEFT!  then/up.") == \
        "a red square moves left then up"
    assert data.clean_caption("The dog's (big) ball") == "the dogs big ball"
