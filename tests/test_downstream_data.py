"""Tests of downstream_data.py: the retrieval benchmarks' annotation variants, the QA annotation,
answer list and answer weights, QA batches (QACollate) and the majority baseline."""

import itertools
import json
import re

import numpy as np
import pytest
import torch
import transformers

import data
import downstream_data
import synthetic

WORDS = ["a", "red", "blue", "square", "circle", "moves", "left", "right", "up", "down", "what",
         "which", "way", "does", "the", "move", "first", "object", "nothing"]


@pytest.fixture(scope="module")
def tokenizer():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(specials + WORDS)})


# --------------------------------------------------------------------------------------------
# Retrieval benchmarks
# --------------------------------------------------------------------------------------------

def write_videos(root, names, num_frames=8, size=32):
    for i, name in enumerate(names):
        frames = np.full((num_frames, size, size, 3), 20 * i, dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        synthetic.write_mp4(str(root / name), frames, fps=8)


def dataset(tmp_path, entries, **kwargs):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(entries))
    write_videos(tmp_path / "videos", sorted({e["video"] for e in entries}))
    kwargs.setdefault("train", False)
    return downstream_data.RetrievalDataset(path, tmp_path / "videos", frames=2, image_size=16,
                                            **kwargs)


def test_string_and_list_captions(tmp_path):
    entries = [{"video": "a.mp4", "caption": "A dog runs."},
               {"video": "b.mp4", "caption": ["a cat sits", "the cat, sitting"]}]
    train = dataset(tmp_path, entries, train=True)
    # each caption one training item; captions of one video share its video_id (VTC positives)
    assert [(text, vid) for text, vid in train.items] == [
        ("a dog runs", 0), ("a cat sits", 1), ("the cat sitting", 1)]
    test = dataset(tmp_path, entries)
    assert len(test) == 2 and test.captions == [("a dog runs", 0), ("a cat sits", 1),
                                                ("the cat sitting", 1)]
    assert test.ground_truth == [[0], [1], [1]]


def test_paragraph_joins_sentences(tmp_path):
    entries = [{"video": "a.mp4", "caption": ["A man enters.", "He sits down."]},
               {"video": "b.mp4", "caption": "one sentence"}]
    train = dataset(tmp_path, entries, train=True, paragraph=True)
    assert train.items == [("a man enters he sits down", 0), ("one sentence", 1)]
    test = dataset(tmp_path, entries, paragraph=True)
    assert test.captions == [("a man enters he sits down", 0), ("one sentence", 1)]


def test_several_ground_truth_videos(tmp_path):
    entries = [{"video": "a.mp4", "caption": "pushing something"},
               {"video": "b.mp4", "caption": "pulling something"},
               {"video": "c.mp4", "caption": "Pushing something."}]
    test = dataset(tmp_path, entries)
    assert test.captions == [("pushing something", 0), ("pulling something", 1)]
    assert test.ground_truth == [[0, 2], [1]]
    assert test.ground_truth_matrix().tolist() == [[True, False, True], [False, True, False]]


def test_join_paragraph_keeps_the_order_of_the_sentences():
    assert downstream_data.join_paragraph([" First. ", "Second.", "third "]) == (
        "First. Second. third")
    assert downstream_data.join_paragraph("  one sentence ") == "one sentence"


# --------------------------------------------------------------------------------------------
# Video question answering
# --------------------------------------------------------------------------------------------

def qa_set(tmp_path, entries, **kwargs):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(entries))
    for i, video in enumerate(sorted({e["video"] for e in entries})):
        synthetic.write_mp4(str(tmp_path / video), np.full((6, 32, 32, 3), 40 * i, np.uint8), fps=8)
    kwargs.setdefault("train", False)
    return downstream_data.VideoQADataset(path, tmp_path, frames=2, image_size=16, **kwargs)


def test_answer_weights_are_one_over_n():
    assert downstream_data.answer_weights("Left.") == {"left": 1.0}
    weights = downstream_data.answer_weights(["left", "Left", "up", "down"])
    assert weights == {"left": 0.5, "up": 0.25, "down": 0.25}
    assert sum(weights.values()) == pytest.approx(1.0)


def test_answers_string_or_list_and_outside_the_list(tmp_path, tokenizer):
    entries = [{"video": "a.mp4", "question": "Which way does the red square move?",
                "answer": "left", "question_id": "q7"},
               {"video": "b.mp4", "question": "what moves first", "answer": ["red square"] * 2
                + ["blue circle"]},
               {"video": "a.mp4", "question": "what", "answer": "sideways"}]
    qa = qa_set(tmp_path, entries, answer_list=["left", "right", "red square", "blue circle"])
    assert len(qa) == 3 and len(qa.videos) == 2
    assert qa.outside_list == 1   # "sideways"
    first, second = qa[0], qa[1]
    assert first["question"] == "which way does the red square move"
    assert first["answers"] == ["left"] and first["weights"] == [1.0]
    assert first["question_id"] == "q7" and second["question_id"] == 1
    assert second["answers"] == ["red square", "blue circle"]
    assert second["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert first["video"].shape == (2, 3, 16, 16)
    batch = downstream_data.QACollate(tokenizer, question_len=25, answer_len=5)([first, second])
    assert batch["answer_ids"].shape[0] == 3
    assert batch["answer_question"].tolist() == [0, 1, 1]
    assert batch["answer_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    torch.testing.assert_close(batch["answer_weight"], torch.tensor([1.0, 2 / 3, 1 / 3]))


def test_questions_of_one_clip_share_its_row(tmp_path, tokenizer):
    import finetune
    from config import SViTTConfig
    from run_control import ResumableSampler
    entries = [{"video": v, "question": "which way does the red square move", "answer": "left"}
               for v in ("a.mp4", "b.mp4", "a.mp4", "c.mp4", "b.mp4", "a.mp4")]
    qa = qa_set(tmp_path, entries)
    assert qa.groups is None                       # not asked: questions are drawn one by one
    batch = downstream_data.QACollate(tokenizer)([qa[i] for i in range(6)])
    assert batch["video"].shape[0] == 3            # a, b, c: each clip once
    assert batch["question_video"].tolist() == [0, 1, 0, 2, 1, 0]
    torch.testing.assert_close(batch["video"][batch["question_video"]],
                               torch.stack([qa[i]["video"] for i in range(6)]))
    # the tiny preset's training batches hold a clip's questions together
    config = SViTTConfig(frames=2, image_size=16)
    grouped = finetune.task_dataset("qa", tmp_path / "qa.json", tmp_path, config, train=True)
    assert grouped.groups == [item[1] for item in grouped.items]
    sampler = ResumableSampler(grouped, world=1, rank=0, seed=3, batch_size=3,
                               groups=grouped.groups)
    order = [grouped.items[i][1] for _, i in sampler]
    assert len(order) == 6
    assert [clip for clip, _ in itertools.groupby(order)] == list(dict.fromkeys(order))  # runs
    assert not finetune.task_dataset("qa", tmp_path / "qa.json", tmp_path, config,
                                     train=False).groups


def test_entry_without_question_names_the_file(tmp_path):
    path = tmp_path / "broken_qa.json"
    path.write_text(json.dumps([{"video": "a.mp4", "question": "q", "answer": "a"},
                                {"video": "b.mp4", "answer": "left"}]))
    with pytest.raises(data.AnnotationError, match=r"broken_qa\.json: entry 1 .*no 'question'"):
        downstream_data.load_qa_annotation(path)
    with pytest.raises(data.AnnotationError, match=r"answers\.json: .*list of strings"):
        (tmp_path / "answers.json").write_text('{"left": 1}')
        downstream_data.load_answer_list(tmp_path / "answers.json")


@pytest.mark.parametrize("content, message", [
    ({"video": "a.mp4"}, r"expected a non-empty JSON list"),
    ([], r"expected a non-empty JSON list"),
    (["a.mp4"], r"entry 0 \"a\.mp4\": is not an object with 'video', 'question' and 'answer'"),
    ([{"video": "a.mp4", "question": "q"}], r"entry 0 .*: has no 'answer' key"),
    ([{"video": "", "question": "q", "answer": "a"}],
     r"entry 0 .*: 'video' must be a non-empty string"),
    ([{"video": "a.mp4", "question": "?!", "answer": "a"}],
     r"entry 0 .*: 'question' must be a non-empty string"),
    ([{"video": "a.mp4", "question": "q", "answer": "a"},
      {"video": "a.mp4", "question": "q", "answer": []}],
     r"entry 1 .*'answer' must be a non-empty string or a non-empty list of them"),
    ([{"video": "a.mp4", "question": "q", "answer": ["up", 3]}],
     r"entry 0 .*: 'answer' must be a non-empty string or a non-empty list of them"),
])
def test_bad_qa_annotation_names_the_file_and_entry(tmp_path, content, message):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(content))
    folder = re.escape(str(tmp_path))
    with pytest.raises(data.AnnotationError, match=rf"^{folder}/qa\.json: {message}"):
        downstream_data.load_qa_annotation(path)


def test_answer_list_is_cleaned_without_duplicates(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(["Left.", "red square", "left", "Right", "Red-Square"]))
    assert downstream_data.load_answer_list(path) == ["left", "red square", "right"]


@pytest.mark.parametrize("content, message", [
    (None, r"answer list not found"),
    ("[\"left\",", r"not a JSON file"),
    ("[]", r"an answer list is a non-empty JSON list of strings"),
    ("[\"left\", 2]", r"an answer list is a non-empty JSON list of strings"),
    ("[\"left\", \"?\"]", r"an answer list is a non-empty JSON list of strings"),  # cleans to ""
])
def test_bad_answer_list_names_the_file(tmp_path, content, message):
    path = tmp_path / "answers.json"
    if content is not None:
        path.write_text(content)
    folder = re.escape(str(tmp_path))
    with pytest.raises(data.AnnotationError, match=rf"^{folder}/answers\.json: {message}"):
        downstream_data.load_answer_list(path)


def test_majority_baseline_per_type():
    train = [{"type": "dir", "answer": "up"}, {"type": "dir", "answer": "up"},
             {"type": "dir", "answer": "left"}, {"type": "obj", "answer": "red square"}]
    test = [{"type": "dir", "answer": "up"}, {"type": "dir", "answer": "down"},
            {"type": "obj", "answer": "red square"}, {"type": "obj", "answer": "blue circle"}]
    baseline = downstream_data.majority_baseline(train, test)
    assert baseline["per_type"] == {"dir": 50.0, "obj": 50.0}
    assert baseline["overall"] == 50.0 and baseline["answers"] == {"dir": "up", "obj": "red square"}
