"""Tests for collate.py: batch shapes and BERT's MLM masking rates (Eq. 31).

The tokenizer is a tiny BERT WordPiece vocabulary built in memory, so nothing is downloaded.
"""

import numpy as np
import pytest
import torch
import transformers

import collate

WORDS = ["a", "red", "green", "blue", "video", "square", "circle", "moves", "left", "right", "up",
         "down", "then", "of", "the", "sky", "sea", "dog", "cat", "runs"]


@pytest.fixture(scope="module")
def tokenizer():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {word: i for i, word in enumerate(specials + WORDS)}
    return transformers.BertTokenizer(vocab=vocab)


def test_collate_shapes_and_video_ids(tokenizer):
    items = [{"video": torch.zeros(4, 3, 16, 16), "caption": caption, "video_id": video_id,
              "path": f"v{video_id}.mp4", "skipped": skipped}
             for caption, video_id, skipped in [("a red square", 0, []),
                                               ("a dog runs left then up", 7, ["x.mp4"]),
                                               ("the sea", 7, ["y.mp4", "z.mp4"])]]
    batch = collate.make_collate(tokenizer, text_len=6, seed=0)(items)
    assert batch["video"].shape == (3, 4, 3, 16, 16)
    assert batch["input_ids"].shape == (3, 6)           # truncated to text_len
    assert batch["attention_mask"].tolist()[2] == [1, 1, 1, 1, 0, 0]
    assert batch["mlm_input_ids"].shape == batch["mlm_labels"].shape == (3, 6)
    assert batch["video_id"].dtype == torch.long and batch["video_id"].tolist() == [0, 7, 7]
    assert batch["skipped"] == ["x.mp4", "y.mp4", "z.mp4"]
    assert batch["paths"] == ["v0.mp4", "v7.mp4", "v7.mp4"]


def test_mlm_masking_rates(tokenizer):
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(3000)]
    items = [{"video": torch.zeros(1), "caption": caption, "video_id": 0, "path": "",
              "skipped": []} for caption in captions]
    batch = collate.make_collate(tokenizer, text_len=32, seed=0)(items)
    ids, labels, masked_ids = batch["input_ids"], batch["mlm_labels"], batch["mlm_input_ids"]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    maskable = batch["attention_mask"].bool() & ~special
    chosen = labels != -100
    assert not (chosen & ~maskable).any()                  # never [CLS], [SEP] or padding
    assert torch.equal(masked_ids[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    to_mask = chosen & (masked_ids == tokenizer.mask_token_id)
    unchanged = chosen & (masked_ids == ids)
    replaced = chosen & ~to_mask & ~unchanged
    n = chosen.sum()
    assert abs(to_mask.sum() / n - 0.8) < 0.03
    # a random token equals the original one time in len(WORDS)
    assert abs(unchanged.sum() / n - 0.1 * (1 + 1 / len(WORDS))) < 0.02
    assert abs(replaced.sum() / n - 0.1 * (1 - 1 / len(WORDS))) < 0.02
    assert not torch.isin(masked_ids[replaced], torch.tensor(tokenizer.all_special_ids)).any()


def test_group_ids_number_the_groups_of_a_batch(tokenizer):
    """Items of one group share a number, in order of first appearance; no group is -1."""
    assert collate.batch_group_ids(["s/7", 3, "s/7", None, 3, "s/1"]).tolist() == [
        0, 1, 0, -1, 1, 2]
    items = [{"video": torch.zeros(1, 3, 8, 8), "caption": "a red square", "video_id": i,
              "path": f"v{i}.mp4", "skipped": [], **({"group": g} if g is not None else {})}
             for i, g in enumerate(["b", None, "b"])]
    batch = collate.make_collate(tokenizer, text_len=6, seed=0)(items)
    assert batch["group_id"].dtype == torch.long and batch["group_id"].tolist() == [0, -1, 0]
