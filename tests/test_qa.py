"""Tests for video question answering: the QA annotation and answer list (data.py), the answer
weights, the answer decoder's loss and the ranking of the answer list (qa.py)."""

import json

import numpy as np
import pytest
import torch
import transformers

import data
import synthetic

WORDS = ["a", "red", "blue", "square", "circle", "moves", "left", "right", "up", "down", "what",
         "which", "way", "does", "the", "move", "first", "object", "nothing"]


@pytest.fixture(scope="module")
def tokenizer():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(specials + WORDS)})


def qa_set(tmp_path, entries, **kwargs):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(entries))
    for i, video in enumerate(sorted({e["video"] for e in entries})):
        synthetic.write_mp4(str(tmp_path / video), np.full((6, 32, 32, 3), 40 * i, np.uint8), fps=8)
    kwargs.setdefault("train", False)
    return data.VideoQADataset(path, tmp_path, frames=2, image_size=16, **kwargs)


def test_answer_weights_are_one_over_n():
    assert data.answer_weights("Left.") == {"left": 1.0}
    weights = data.answer_weights(["left", "Left", "up", "down"])
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
    batch = data.QACollate(tokenizer, question_len=25, answer_len=5)([first, second])
    assert batch["answer_ids"].shape[0] == 3
    assert batch["answer_question"].tolist() == [0, 1, 1]
    assert batch["answer_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    torch.testing.assert_close(batch["answer_weight"], torch.tensor([1.0, 2 / 3, 1 / 3]))


def test_entry_without_question_names_the_file(tmp_path):
    path = tmp_path / "broken_qa.json"
    path.write_text(json.dumps([{"video": "a.mp4", "question": "q", "answer": "a"},
                                {"video": "b.mp4", "answer": "left"}]))
    with pytest.raises(data.AnnotationError, match=r"broken_qa\.json: entry 1 .*no 'question'"):
        data.load_qa_annotation(path)
    with pytest.raises(data.AnnotationError, match=r"answers\.json: .*list of strings"):
        (tmp_path / "answers.json").write_text('{"left": 1}')
        data.load_answer_list(tmp_path / "answers.json")


def test_majority_baseline_per_type():
    train = [{"type": "dir", "answer": "up"}, {"type": "dir", "answer": "up"},
             {"type": "dir", "answer": "left"}, {"type": "obj", "answer": "red square"}]
    test = [{"type": "dir", "answer": "up"}, {"type": "dir", "answer": "down"},
            {"type": "obj", "answer": "red square"}, {"type": "obj", "answer": "blue circle"}]
    baseline = data.majority_baseline(train, test)
    assert baseline["per_type"] == {"dir": 50.0, "obj": 50.0}
    assert baseline["overall"] == 50.0 and baseline["answers"] == {"dir": "up", "obj": "red square"}
