"""Video question answering with SViTT (Sec. 5, Table 6): an answer decoder on the multimodal
encoder, its weighted language-model loss, and the ranking of a fixed answer list.

The model follows Singularity's and the authors' QA model:

* the question goes through the text encoder f_t and the multimodal encoder f_m, whose
  cross-attention reads the (pruned) video tokens: Eq. 12-13 cut them to ceil(q_m n) after the
  first multimodal layer, with q_m = 0.5 for QA (Table 9);
* a 3-layer BERT-style decoder (causal self-attention over the answer so far, cross-attention to
  the question states, FFN) generates the answer tokens after a [CLS] start token. Its layers start
  as copies of f_m's layers (the authors initialise the decoder from the multimodal layers; a
  cross-attention whose shape differs, as in the `tiny` preset where the video is narrower than
  the text, starts new). It reads and writes BERT's vocabulary through the model's word embeddings
  and MLM head, which it shares with the encoders;
* training loss: the decoder's language-model loss, the negative log-likelihood of each answer
  summed over its tokens, weighted by the answer's share of the question's answers (1/n each, see
  `downstream_data.answer_weights`) and averaged over questions;
* evaluation ranks the fixed answer list: the k answers whose first token is most probable, then
  those k by the whole answer's likelihood (`rank_answers`); the metric is exact-match accuracy.

    model = SViTTQA(config)                  # or SViTTQA.from_pretraining(checkpoint, config)
    out = model(batch)                       # a QACollate batch; out["loss"].backward()
    prediction = rank_answers(model, states, mask, answer_ids, answer_mask, k=128)
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import collate
import data
import downstream_data
from cpu_speedups import Dropout
from downstream_data import ANSWER_LEN, QUESTION_LEN
from model import BertAttention, SViTT, extended_mask
from pretrained import text_model_path

DECODER_LAYERS = 3  # the answer decoder's depth (Singularity, the authors' code)


class DecoderBlock(nn.Module):
    """A BERT layer that decodes: causal self-attention, cross-attention to the question states
    (padding masked), FFN. Parameter names are model.BertBlock's, so that f_m's layers copy in."""

    def __init__(self, text_config):
        super().__init__()
        w, h = text_config["hidden_size"], text_config["num_attention_heads"]
        eps, p = text_config["layer_norm_eps"], text_config["attention_probs_dropout_prob"]
        self.attention = BertAttention(w, h, eps=eps, dropout=p)
        self.crossattention = BertAttention(w, h, eps=eps, dropout=p)
        self.intermediate = nn.Linear(w, text_config["intermediate_size"])
        self.output = nn.Linear(text_config["intermediate_size"], w)
        self.output_norm = nn.LayerNorm(w, eps=eps)
        self.dropout = Dropout(text_config["hidden_dropout_prob"])

    def forward(self, x, self_mask, context, context_mask):
        x, _ = self.attention(x, mask=self_mask)
        x, _ = self.crossattention(x, context=context, mask=context_mask)
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


def causal_mask(attention_mask, dtype):
    """(B, L) padding mask -> additive (B, 1, L, L): token i sees tokens j <= i that are real."""
    length = attention_mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()     # (B, 1, L, L)
    return (~allowed).to(dtype) * torch.finfo(dtype).min


class SViTTQA(SViTT):
    """SViTT with an answer decoder (see the module docstring). The VTC and VTM heads stay in the
    model, unused, so that a pre-training checkpoint loads as it is."""

    def __init__(self, config, pretrained=True):
        super().__init__(config, pretrained)
        self.answer_decoder = nn.ModuleList(DecoderBlock(config.text_config)
                                            for _ in range(DECODER_LAYERS))
        self.init_decoder_from_multimodal()

    @torch.no_grad()
    def init_decoder_from_multimodal(self):
        """Copy f_m's layer i into decoder layer i wherever the shapes agree."""
        for ours, theirs in zip(self.answer_decoder, self.multimodal_layers):
            source = theirs.state_dict()
            for name, tensor in ours.state_dict().items():
                if name in source and source[name].shape == tensor.shape:
                    tensor.copy_(source[name])

    # ---- the question and the answers ------------------------------------------------------
    def encode_question(self, video, question_ids, question_mask, generator=None, record=None,
                        question_video=None):
        """Question states (B, Lq, C): f_t, then f_m with cross-attention to the video tokens.
        video (V, T, 3, S, S); question_video (B,), the clip of each question (QACollate), or None
        for one clip per question (V = B): a clip is encoded once for all its questions."""
        video_tokens, _, _ = self.encode_video(video, generator, record)
        if question_video is not None:
            video_tokens = video_tokens[question_video]                             # (B, n, d)
        text, _ = self.encode_text(question_ids, question_mask)
        return self.fuse(text, question_mask, video_tokens, record)

    def decode(self, answer_ids, answer_mask, states, question_mask):
        """Vocabulary logits (A, La, V) of the token after each answer position; states and
        question_mask (A, Lq, C), (A, Lq): the question of each answer row."""
        x = self.embeddings(input_ids=answer_ids)                                   # (A, La, C)
        self_mask = causal_mask(answer_mask, x.dtype)
        context_mask = extended_mask(question_mask, x.dtype)
        for layer in self.answer_decoder:
            x = layer(x, self_mask, states, context_mask)
        return self.mlm_head(x)

    def answer_log_likelihood(self, answer_ids, answer_mask, states, question_mask):
        """log p(answer | question, video) (A,): the answer's tokens after [CLS], [SEP] included."""
        logits = self.decode(answer_ids, answer_mask, states, question_mask)[:, :-1].float()
        targets = answer_ids[:, 1:]                                                 # (A, La - 1)
        token_ll = -F.cross_entropy(rearrange(logits, "a l v -> a v l"), targets,
                                    reduction="none")                               # (A, La - 1)
        return (token_ll * answer_mask[:, 1:].to(token_ll.dtype)).sum(1)

    def forward(self, batch, generator=None):
        """batch from downstream_data.QACollate -> {"loss", "loss_qa", "record"}. Loss: the
        answers' negative log-likelihood weighted by answer_weight (1/n per answer), summed per
        question and averaged over the questions."""
        record = {"visual_tokens": [], "visual": [], "multimodal_tokens": [], "multimodal": []}
        states = self.encode_question(batch["video"], batch["question_ids"],
                                      batch["question_mask"], generator, record,
                                      batch.get("question_video"))
        rows = batch["answer_question"]
        log_likelihood = self.answer_log_likelihood(batch["answer_ids"], batch["answer_mask"],
                                                    states[rows], batch["question_mask"][rows])
        loss = -(batch["answer_weight"].to(log_likelihood.dtype) * log_likelihood).sum()
        loss = loss / states.shape[0]
        return {"loss": loss, "loss_qa": loss, "record": record}


# --------------------------------------------------------------------------------------------
# Answering from a fixed list
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def rank_answers(model, states, question_mask, answer_ids, answer_mask, k=128):
    """The best answer of the list for each question: (Q,) indices into the list, the (Q, k)
    candidates (indices into the list) and their whole-answer log-likelihoods (Q, k).

    As Singularity and ALBEF rank: one decoder step from [CLS] gives every answer's first-token
    probability; the k answers with the highest go through the decoder in full, and the one of
    largest log p(answer) wins. With k the size of the list this is scoring every answer in full.
    states (Q, Lq, C), question_mask (Q, Lq); answer_ids and answer_mask (N, La), [CLS] first.
    """
    num_questions, num_answers = states.shape[0], answer_ids.shape[0]
    k = min(k, num_answers)
    start = answer_ids[:1, :1].expand(num_questions, 1)                             # (Q, 1)
    first = model.decode(start, torch.ones_like(start), states, question_mask)[:, 0].float()
    first_token_ll = first.log_softmax(-1)[:, answer_ids[:, 1]]                     # (Q, N)
    candidates = first_token_ll.topk(k, dim=1).indices                              # (Q, k)
    flat = candidates.flatten()                                                     # (Q k,)
    scores = model.answer_log_likelihood(
        answer_ids[flat], answer_mask[flat], states.repeat_interleave(k, 0),
        question_mask.repeat_interleave(k, 0)).view(num_questions, k)               # (Q, k)
    best = candidates.gather(1, scores.argmax(1, keepdim=True))[:, 0]
    return best, candidates, scores


@torch.no_grad()
def evaluate_qa(model, loader, answer_list, tokenizer, device, *, k=128, answer_len=5,
                shuffle=None, generator=None):
    """Exact-match accuracy (percent), overall and per question type, and the predictions.

    loader yields downstream_data.QACollate batches; `shuffle(video, first_index)` may reorder
    frames (temporal probing, Table 14), one order per clip, shared by the clip's questions. A
    question is right when the predicted answer is one of its answers (after cleaning); questions
    whose answers are outside the list are always wrong.
    """
    tokens = collate.tokenize_captions(tokenizer, answer_list, answer_len)
    answer_ids = tokens["input_ids"].to(device)
    answer_mask = tokens["attention_mask"].to(device)
    predictions, right, kinds, seen = [], [], [], 0
    for batch in loader:
        video = batch["video"]
        if shuffle is not None:
            video = shuffle(video, seen)
        seen += len(video)
        states = model.encode_question(video.to(device), batch["question_ids"].to(device),
                                       batch["question_mask"].to(device), generator,
                                       question_video=batch["question_video"].to(device))
        best, _, _ = rank_answers(model, states, batch["question_mask"].to(device), answer_ids,
                               answer_mask, k=k)
        for question_id, answers, kind, index in zip(batch["question_id"], batch["answers"],
                                                     batch["type"], best.tolist()):
            predictions.append({"question_id": question_id, "answer": answer_list[index],
                                "right": answer_list[index] in answers, "type": kind})
            right.append(answer_list[index] in answers)
            kinds.append(kind)
    per_type = {kind: 100.0 * sum(r for r, t in zip(right, kinds) if t == kind) / kinds.count(kind)
                for kind in sorted(set(kinds))}
    return {"accuracy": 100.0 * sum(right) / max(1, len(right)), "per_type": per_type,
            "questions": len(right), "predictions": predictions}


def evaluate_qa_split(model, config, checkpoint, annotation, video_root, answer_list, device, *,
                      batch_size, workers, seed, k=128, shuffle=None):
    """`python eval.py --task qa`: accuracy of `model` on the QA test split `annotation`, printed
    as a table; with `shuffle` (a frame reordering, see evaluate_qa) the same with frames out of
    order (Table 14). -> the result that eval.py writes."""
    answers = downstream_data.load_answer_list(answer_list)
    dataset = downstream_data.VideoQADataset(annotation, video_root, answer_list=answers,
                                             frames=config.frames, image_size=config.image_size,
                                             train=False, mean=config.image_mean,
                                             std=config.image_std)
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers,
        collate_fn=downstream_data.QACollate(tokenizer, question_len=QUESTION_LEN,
                                             answer_len=ANSWER_LEN))

    def run_once(shuffle=None):
        generator = torch.Generator(device).manual_seed(seed)
        return evaluate_qa(model, loader, answers, tokenizer, device, k=k,
                           answer_len=ANSWER_LEN, shuffle=shuffle, generator=generator)

    result = {"checkpoint": str(checkpoint), "split": str(annotation), "task": "qa",
              "questions": len(dataset), "answers": len(answers), "k": k,
              "outside_list": dataset.outside_list, "normal": run_once()}
    print(f"{checkpoint}: T={config.frames}, (q_v, q_m)=({config.keep_rate_v}, "
          f"{config.keep_rate_m}); {annotation}: {len(dataset)} questions, {len(answers)} answers "
          f"({dataset.outside_list} questions answered outside the list)")
    rows = {"normal": result["normal"]}
    if shuffle is not None:
        rows["shuffled"] = result["shuffled"] = run_once(shuffle)
        result["shuffle_difference"] = result["normal"]["accuracy"] - rows["shuffled"]["accuracy"]
    kinds = sorted(result["normal"]["per_type"])
    print(f"{'':10}{'accuracy':>10}" + "".join(f"{kind:>12}" for kind in kinds))
    for name, row in rows.items():
        print(f"{name:10}{row['accuracy']:>10.1f}"
              + "".join(f"{row['per_type'][kind]:>12.1f}" for kind in kinds))
    return result
