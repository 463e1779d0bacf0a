"""Tests for video question answering: the answer decoder's loss and the ranking of the answer
list (qa.py), and the synthetic questions. The QA annotation, answer list, answer weights and
QACollate (downstream_data.py) are tested in test_downstream_data.py."""

import torch

import synthetic

# --------------------------------------------------------------------------------------------
# The model: loss and ranking
# --------------------------------------------------------------------------------------------

def small_qa_model():
    import model as svitt
    import qa
    text_config = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 4,
                   "num_attention_heads": 2, "intermediate_size": 64,
                   "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
                   "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                   "pad_token_id": 0}
    config = svitt.SViTTConfig(frames=2, image_size=32, vision_width=32, vision_layers=2,
                               vision_heads=1, block_size=2, prune_after=[1], keep_rate_m=0.5,
                               text_layers=1, multimodal_layers=3, text_config=text_config,
                               text_model="none")
    torch.manual_seed(0)
    return qa.SViTTQA(config, pretrained=False).eval()


def brute_force_log_likelihood(model, answer, states, question_mask):
    """log p(answer) token by token: each prefix decoded on its own, no padding, no batching."""
    total = 0.0
    for i in range(1, len(answer)):
        prefix = torch.tensor([answer[:i]])
        logits = model.decode(prefix, torch.ones_like(prefix), states, question_mask)[0, -1]
        total += logits.log_softmax(-1)[answer[i]].item()
    return total


def test_decoder_starts_from_the_multimodal_layers():
    model = small_qa_model()
    for ours, theirs in zip(model.answer_decoder, model.multimodal_layers):
        assert torch.equal(ours.attention.query.weight, theirs.attention.query.weight)
        assert torch.equal(ours.output.weight, theirs.output.weight)
        assert torch.equal(ours.crossattention.key.weight, theirs.crossattention.key.weight)


def test_ranking_with_k_the_whole_list_is_brute_force():
    import qa
    model = small_qa_model()
    # answers of 1 to 3 tokens between [CLS] (2) and [SEP] (3), padded with 0; several share
    # their first token, so the first step alone cannot tell them apart
    answers = [[5], [5, 6], [5, 7, 8], [9], [9, 10], [11, 12, 13], [14], [15, 6]]
    ids = torch.zeros(len(answers), 5, dtype=torch.long)
    for row, tokens in enumerate(answers):
        ids[row, :len(tokens) + 2] = torch.tensor([2, *tokens, 3])
    mask = (ids != 0).long()
    states = torch.randn(4, 6, 32)
    question_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3, [1] * 6])
    brute = torch.tensor([[brute_force_log_likelihood(model, [2, *a, 3], states[q:q + 1],
                                                      question_mask[q:q + 1]) for a in answers]
                          for q in range(4)])                                      # (Q, N)
    best, candidates, scores = qa.rank_answers(model, states, question_mask, ids, mask,
                                               k=len(answers))
    torch.testing.assert_close(scores, brute.gather(1, candidates), rtol=1e-4, atol=1e-4)
    assert best.tolist() == brute.argmax(1).tolist()
    # a smaller k: the best whole answer among the k of most probable first token
    best, candidates, _ = qa.rank_answers(model, states, question_mask, ids, mask, k=3)
    assert candidates.shape == (4, 3)
    expected = candidates.gather(1, brute.gather(1, candidates).argmax(1, keepdim=True))[:, 0]
    assert best.tolist() == expected.tolist()


def question_inputs(seed, questions):
    """Two clips of small_qa_model's shape and `questions` full-length questions of 6 tokens."""
    torch.manual_seed(seed)
    video = torch.randn(2, 2, 3, 32, 32)
    question_ids = torch.randint(5, 40, (questions, 6))
    return video, question_ids, torch.ones(questions, 6, dtype=torch.long)


def test_loss_weights_repeated_answers():
    model = small_qa_model()
    video, question_ids, question_mask = question_inputs(1, 2)
    answers = torch.tensor([[2, 5, 3, 0], [2, 9, 10, 3], [2, 7, 3, 0]])
    answer_mask = (answers != 0).long()

    def loss(rows, weights):
        batch = {"video": video, "question_ids": question_ids, "question_mask": question_mask,
                 "answer_ids": answers[rows], "answer_mask": answer_mask[rows],
                 "answer_question": torch.tensor([0] * (len(rows) - 1) + [1]),
                 "answer_weight": torch.tensor(weights)}
        return model(batch, generator=torch.Generator().manual_seed(0))["loss"]

    # question 0 answered ["a", "a", "b"] (weights 2/3, 1/3), question 1 answered "c"
    merged = loss([0, 1, 2], [2 / 3, 1 / 3, 1.0])
    repeated = loss([0, 0, 1, 2], [1 / 3, 1 / 3, 1 / 3, 1.0])
    torch.testing.assert_close(merged, repeated)
    states = model.encode_question(video, question_ids, question_mask,
                                   torch.Generator().manual_seed(0))
    ll = model.answer_log_likelihood(answers, answer_mask, states[[0, 0, 1]],
                                     question_mask[[0, 0, 1]])
    expected = -(2 / 3 * ll[0] + 1 / 3 * ll[1] + ll[2]) / 2
    torch.testing.assert_close(merged, expected)
    unweighted = loss([0, 1, 2], [1.0, 1.0, 1.0])
    assert not torch.allclose(unweighted, merged)


def test_a_clip_encoded_once_for_its_questions():
    model = small_qa_model()
    video, question_ids, question_mask = question_inputs(2, 3)
    rows = torch.tensor([1, 0, 1])
    shared = model.encode_question(video, question_ids, question_mask,
                                   torch.Generator().manual_seed(0), question_video=rows)
    each = model.encode_question(video[rows], question_ids, question_mask,
                                 torch.Generator().manual_seed(0))
    torch.testing.assert_close(shared, each)
    other = model.encode_question(video[torch.tensor([0, 1, 0])], question_ids, question_mask,
                                  torch.Generator().manual_seed(0))
    assert not torch.allclose(shared, other)    # the rows do pick each question's clip


def test_synthetic_questions_need_time():
    clip = "a red square moves up, then a blue circle moves left"
    reversed_clip = "a blue circle moves right, then a red square moves down"
    swapped = "a blue circle moves left, then a red square moves up"
    answers = {c: {(q["question"], q["answer"]) for q in synthetic.clip_questions(c)}
               for c in (clip, reversed_clip, swapped)}
    assert ("which object moves first", "red square") in answers[clip]
    assert ("which object moves first", "blue circle") in answers[reversed_clip]
    assert ("which way does the red square move", "down") in answers[reversed_clip]
    assert ("what moves after the red square", "blue circle") in answers[clip]
    assert ("what moves after the red square", "nothing") in answers[swapped]
    # the same questions, other answers: a clip and its reversal share no answer; the swap keeps
    # only the directions
    assert not answers[clip] & answers[reversed_clip]
    assert {q for q, _ in answers[clip] & answers[swapped]} == {
        "which way does the red square move", "which way does the blue circle move"}
    listed = set(synthetic.synthetic_answer_list())
    assert all(a in listed for pairs in answers.values() for _, a in pairs)
