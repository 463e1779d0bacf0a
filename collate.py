"""Batches for SViTT: the DataLoader collate_fn that stacks clips and turns captions into token
ids, with BERT's masking for MLM (Eq. 31, Sec. A.3).

Usage:
    loader = torch.utils.data.DataLoader(VideoTextDataset(...), batch_size=32, shuffle=True,
                                         collate_fn=make_collate(tokenizer, text_len=32, seed=0))
    tokens = tokenize_captions(tokenizer, ["a red square moves left"])  # evaluation's captions

Captions are cleaned as the dataset stores them (`data.clean_caption`) and padded to the longest
of the batch. With a seed, a batch's masks depend only on the seed and its items, not on the
DataLoader worker that collates it.
"""
import numpy as np
import torch

from data import clean_caption


def tokenize_captions(tokenizer, captions, text_len=32):
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

    def __init__(self, tokenizer, *, text_len, mlm_probability, seed):
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.mlm_probability = mlm_probability
        self.seed = seed
        special = set(tokenizer.all_special_ids)
        self.special_ids = torch.tensor(sorted(special))
        self.random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def _generator(self, items):
        if self.seed is None:
            return None
        entropy = [self.seed] + [item.get("seed", i) for i, item in enumerate(items)]
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)

    def __call__(self, items):
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
            # the group of each item as a number within the batch; -1 where it has none
            "group_id": batch_group_ids([item.get("group") for item in items]),
            "paths": [item["path"] for item in items],
            "captions": captions,
            "skipped": [path for item in items for path in item["skipped"]],
        }


def batch_group_ids(groups):
    """(B,) long: items of one group share a number (0, 1, ... in order of first appearance), and
    items without a group (None) get -1."""
    numbers = {}
    return torch.tensor([-1 if g is None else numbers.setdefault(g, len(numbers)) for g in groups],
                        dtype=torch.long)


def make_collate(tokenizer, *, text_len=32, mlm_probability=0.15, seed=None):
    """The DataLoader collate_fn for VideoTextDataset items (see VideoTextCollate)."""
    return VideoTextCollate(tokenizer, text_len=text_len, mlm_probability=mlm_probability,
                            seed=seed)
