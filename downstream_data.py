"""Data of the downstream tasks (paper Sec. 5, Tables 5, 6, 14): retrieval benchmarks' annotation
variants and video question answering.

Clips are read as `data.VideoTextDataset` reads them (sampling, crops, unreadable clips skipped in
training, an error naming the file at test time); this file adds what the benchmarks' annotations
and the QA task need on top:

  RetrievalDataset     several captions a video (MSR-VTT), paragraphs (DiDeMo), one caption for
                       several videos (SSv2-label); `ground_truth_matrix()` for the metrics
  VideoQADataset       one item per question, answers cleaned and weighted 1/n (answer_weights)
  QACollate            clips, question tokens and every answer's tokens of a batch
  task_collate         the collate of each task's batches (RetrievalCollate: no MLM inputs)
  load_qa_annotation, load_answer_list, majority_baseline

Usage:
    test_set = RetrievalDataset("msrvtt_test.json", "videos/", frames=4, image_size=112,
                                train=False)
    qa_set = VideoQADataset("qa_train.json", "videos/", frames=4, image_size=112, train=True,
                            answer_list=load_answer_list("answers.json"))
    loader = torch.utils.data.DataLoader(qa_set, batch_size=32,
                                         collate_fn=QACollate(tokenizer, question_len=25))

`finetune.py` picks the dataset of a task; `synthetic.py` writes a QA split in this
format and prints its majority baseline.
"""

import logging
import os

import torch

from collate import VideoTextCollate, make_collate, tokenize_captions
from data import (
    AnnotationError,
    VideoTextDataset,
    clean_caption,
    entry_error,
    load_annotation,
    read_json,
    validate_annotation,
)

QUESTION_LEN = 25        # question tokens (Table 9, QA)
ANSWER_LEN = 5           # answer tokens, [CLS] and [SEP] included (Table 9, QA)
PARAGRAPH_TEXT_LEN = 64  # text tokens of paragraph retrieval (Table 9: 64 for DiDeMo)

logger = logging.getLogger("data")  # the loader's warnings, wherever the dataset is defined


class RetrievalDataset(VideoTextDataset):
    """VideoTextDataset with the annotation variants of the retrieval benchmarks, read as
    Singularity reads them:

    - `caption` a string or a list (MSR-VTT): in training each caption is one item and the
      captions of one video are positives of each other (same video_id); at test time each caption
      is a query.
    - paragraph=True (DiDeMo, ActivityNet Captions): the list of sentences of a video is joined
      into one text, one item per video (use a longer text length, 64 in Table 9).
    - the same caption for several videos (SSv2-label/template): at test time the caption is one
      query whose ground truth is all those videos; the best-ranked of them counts.

    Test-time attributes: `captions`, the unique (caption, first video_id) pairs, and
    `ground_truth`, the video ids of each caption, in the order of `captions`.
    """

    def __init__(self, annotation, video_root, *, paragraph: bool = False, **kwargs):
        name = "annotation list" if isinstance(annotation, list) else os.fspath(annotation)
        entries = (validate_annotation(annotation, name) if isinstance(annotation, list)
                   else load_annotation(annotation))
        if paragraph:
            entries = [{**entry, "caption": join_paragraph(entry["caption"])}
                       for entry in entries]
        super().__init__(entries, video_root, **kwargs)
        self.annotation_name = name
        self.paragraph = paragraph
        videos_of: dict[str, list[int]] = {}
        for text, video_id in self.captions:
            ids = videos_of.setdefault(text, [])
            if video_id not in ids:
                ids.append(video_id)
        if not self.train:
            self.captions = [(text, ids[0]) for text, ids in videos_of.items()]
        self.ground_truth = [videos_of[text] for text, _ in self.captions]

    def ground_truth_matrix(self) -> torch.Tensor:
        """Bool (captions, videos): True where the video is a right answer to the caption."""
        matrix = torch.zeros(len(self.captions), len(self.videos), dtype=torch.bool)
        for row, ids in enumerate(self.ground_truth):
            matrix[row, ids] = True
        return matrix


def join_paragraph(caption) -> str:
    """Paragraph retrieval: the sentences of a video joined into one text, in order."""
    sentences = caption if isinstance(caption, list) else [caption]
    return " ".join(sentence.strip() for sentence in sentences)


def answer_weights(answers) -> dict[str, float]:
    """{answer: weight} of one question: each of its n answers weighs 1/n, so an answer given
    k times weighs k/n and the weights sum to 1 (the VQA convention the authors' code follows)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    weights: dict[str, float] = {}
    for answer in answers:
        text = clean_caption(answer)
        weights[text] = weights.get(text, 0.0) + 1.0 / len(answers)
    return weights


def validate_qa_annotation(entries, name: str) -> list[dict]:
    """Check a QA annotation: a non-empty list of {"video": str, "question": str,
    "answer": str | [str], "question_id" (optional), "type" (optional)}."""
    if not isinstance(entries, list) or not entries:
        raise AnnotationError(f"{name}: expected a non-empty JSON list of "
                              f"{{\"video\", \"question\", \"answer\"}} entries")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise entry_error(name, index, entry, "is not an object with 'video', 'question' "
                                                   "and 'answer'")
        for key in ("video", "question", "answer"):
            if key not in entry:
                raise entry_error(name, index, entry, f"has no '{key}' key")
        if not isinstance(entry["video"], str) or not entry["video"]:
            raise entry_error(name, index, entry, "'video' must be a non-empty string")
        if not isinstance(entry["question"], str) or not clean_caption(entry["question"]):
            raise entry_error(name, index, entry, "'question' must be a non-empty string")
        answer = entry["answer"]
        answers = answer if isinstance(answer, list) else [answer]
        if not answers or not all(isinstance(a, str) and clean_caption(a) for a in answers):
            raise entry_error(name, index, entry,
                               "'answer' must be a non-empty string or a non-empty list of them")
    return entries


def load_qa_annotation(path) -> list[dict]:
    """Read and validate a QA annotation file; AnnotationError names the file and entry."""
    return validate_qa_annotation(read_json(path), os.fspath(path))


def load_answer_list(path) -> list[str]:
    """The answer list of a QA benchmark: a JSON list of strings, cleaned, duplicates dropped."""
    path = os.fspath(path)
    answers = read_json(path, "answer list")
    if not isinstance(answers, list) or not answers or not all(
            isinstance(a, str) and clean_caption(a) for a in answers):
        raise AnnotationError(f"{path}: an answer list is a non-empty JSON list of strings")
    return list(dict.fromkeys(clean_caption(a) for a in answers))


class VideoQADataset(VideoTextDataset):
    """Video question answering: one item per question, its clip read as VideoTextDataset reads
    clips (sampling, crops, unreadable clips skipped in training, an error at test time).

    Items add to the clip: "question" (cleaned), "answers" and "weights" (answer_weights),
    "question_id" (the entry's, else its index) and "type" (the entry's, else ""). Questions and
    answers are cleaned as captions are (lower case, no punctuation), so "Left." matches "left".
    With an answer list, `outside_list` counts the questions none of whose answers is in it: at
    test time they count as wrong, since the model answers from the list. With `group_by_video`
    each item's group is its clip, so that a training batch holds the questions of a clip together
    and QACollate gives the clip one row (encoded once for all its questions).
    """

    def __init__(self, annotation, video_root, *, answer_list=None, group_by_video=False,
                 **kwargs):
        name = "annotation list" if isinstance(annotation, list) else os.fspath(annotation)
        entries = (validate_qa_annotation(annotation, name) if isinstance(annotation, list)
                   else load_qa_annotation(annotation))
        # the clips are read by VideoTextDataset; an item's "caption" is its question's number
        super().__init__([{"video": e["video"], "caption": e["question"]} for e in entries],
                         video_root, **kwargs)
        self.annotation_name = name
        self.questions = [{"question": clean_caption(e["question"]),
                           "answers": list(answer_weights(e["answer"])),
                           "weights": list(answer_weights(e["answer"]).values()),
                           "question_id": e.get("question_id", index),
                           "type": str(e.get("type", ""))} for index, e in enumerate(entries)]
        video_ids = {video: video_id for video_id, video in enumerate(self.videos)}
        self.items = [(index, video_ids[e["video"]]) for index, e in enumerate(entries)]
        self.answer_list = answer_list
        if group_by_video:  # training batches hold a clip's questions together (ResumableSampler)
            self.groups = [video_id for _, video_id in self.items]
        listed = set(answer_list or ())
        self.outside_list = sum(not listed & set(q["answers"]) for q in self.questions)
        if answer_list is not None and self.outside_list:
            logger.warning("%s: %d of %d questions have no answer in the answer list",
                           name, self.outside_list, len(self.questions))

    def __getitem__(self, index):
        item = super().__getitem__(index)
        item.update(self.questions[item.pop("caption")])
        return item


class RetrievalCollate(VideoTextCollate):
    """Pre-training's batches without the MLM inputs: fine-tuning for retrieval trains VTC and VTM
    only, and SViTT.forward leaves MLM out when a batch has no mlm_labels."""

    def __call__(self, items):
        batch = super().__call__(items)
        del batch["mlm_input_ids"], batch["mlm_labels"]
        return batch


def task_collate(task, tokenizer, config, seed):
    """The DataLoader collate_fn of a task's batches: "pretrain", "retrieval" or "qa"."""
    if task == "qa":
        return QACollate(tokenizer, question_len=QUESTION_LEN, answer_len=ANSWER_LEN)
    if task == "retrieval":
        return RetrievalCollate(tokenizer, text_len=config.text_len, mlm_probability=0.0,
                                seed=seed)
    return make_collate(tokenizer, text_len=config.text_len,
                        mlm_probability=config.mlm_probability, seed=seed)


class QACollate:
    """collate_fn of VideoQADataset items: clips, questions (question_len tokens) and every
    answer of every question (answer_len tokens, [CLS] first: the decoder's start token).

    The questions of one clip share its row of `video` (the first such item's frames): the model
    encodes each clip of the batch once, and question i reads row question_video[i].
    answer_question[j] is the question (row of the batch) of answer row j; answer_weight[j] its
    weight (answer_weights). A class so that spawned DataLoader workers can pickle it.
    """

    def __init__(self, tokenizer, *, question_len: int = QUESTION_LEN,
                 answer_len: int = ANSWER_LEN):
        self.tokenizer = tokenizer
        self.question_len = question_len
        self.answer_len = answer_len

    def __call__(self, items: list[dict]) -> dict:
        questions = tokenize_captions(self.tokenizer, [item["question"] for item in items],
                                      self.question_len)
        answers = [answer for item in items for answer in item["answers"]]
        answer_tokens = tokenize_captions(self.tokenizer, answers, self.answer_len)
        clip_row: dict[int, int] = {}        # video id -> its row in "video", in order of arrival
        clips = []
        for item in items:
            if item["video_id"] not in clip_row:
                clip_row[item["video_id"]] = len(clips)
                clips.append(item["video"])
        return {
            "video": torch.stack(clips),                                # (V, T, 3, S, S)
            "question_video": torch.tensor([clip_row[item["video_id"]] for item in items],
                                           dtype=torch.long),          # (B,) rows of "video"
            "question_ids": questions["input_ids"],                     # (B, Lq)
            "question_mask": questions["attention_mask"],               # (B, Lq)
            "answer_ids": answer_tokens["input_ids"],                   # (A, La)
            "answer_mask": answer_tokens["attention_mask"],             # (A, La)
            "answer_weight": torch.tensor([w for item in items for w in item["weights"]]),
            "answer_question": torch.tensor([row for row, item in enumerate(items)
                                             for _ in item["answers"]], dtype=torch.long),
            "question_id": [item["question_id"] for item in items],
            "type": [item["type"] for item in items],
            "answers": [item["answers"] for item in items],
            "paths": [item["path"] for item in items],
            "skipped": [path for item in items for path in item["skipped"]],
        }


def majority_baseline(train_entries: list[dict], test_entries: list[dict]) -> dict:
    """Accuracy (percent) of always giving the most frequent training answer of the question's
    type (entries without "type" share one): {"overall": ..., "per_type": {...}}."""
    counts: dict[str, dict[str, int]] = {}
    for entry in train_entries:
        for answer in answer_weights(entry["answer"]):
            per_type = counts.setdefault(str(entry.get("type", "")), {})
            per_type[answer] = per_type.get(answer, 0) + 1
    guess = {kind: max(answers, key=answers.get) for kind, answers in counts.items()}
    right: dict[str, list[bool]] = {}
    for entry in test_entries:
        kind = str(entry.get("type", ""))
        right.setdefault(kind, []).append(guess.get(kind) in answer_weights(entry["answer"]))
    every = [r for hits in right.values() for r in hits]
    return {"overall": 100.0 * sum(every) / len(every),
            "per_type": {kind: 100.0 * sum(hits) / len(hits) for kind, hits in right.items()},
            "answers": guess}
