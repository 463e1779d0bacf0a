import math

import pytest
import torch

from token_pruning import class_attention_scores, keep_tokens, num_kept, text_to_video_scores


@pytest.mark.parametrize("num_regional,keep_rate", [(784, 0.7), (549, 0.7), (97, 0.5), (9, 0.1),
                                                    (10, 1.0)])
def test_keep_tokens_count_class_order(num_regional, keep_rate):
    g = torch.Generator().manual_seed(0)
    B, C = 3, 5
    x = torch.randn(B, 1 + num_regional, C, generator=g)
    scores = torch.rand(B, num_regional, generator=g)
    kept, index = keep_tokens(x, scores, keep_rate)
    expected = math.ceil(round(keep_rate * (1 + num_regional), 9))
    assert kept.shape == (B, expected, C) and index.shape == (B, expected)
    assert (index[:, 0] == 0).all()  # the class token is always kept
    assert (index[:, 1:].diff(dim=1) > 0).all()  # original order
    torch.testing.assert_close(kept, x.gather(1, index[:, :, None].expand(-1, -1, C)))
    for b in range(B):  # the kept regional tokens are the top scores
        top = set((scores[b].topk(expected - 1).indices + 1).tolist())
        assert set(index[b, 1:].tolist()) == top


def test_num_kept_table7_sequence():
    tokens = [785]
    for _ in range(3):
        tokens.append(num_kept(tokens[-1], 0.7))
    assert tokens == [785, 550, 385, 270]
    assert num_kept(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floating point


def test_keep_tokens_gradient_flows_to_kept_tokens_only():
    x = torch.randn(1, 5, 2, requires_grad=True)
    kept, index = keep_tokens(x, torch.tensor([[0.1, 0.9, 0.2, 0.8]]), 0.6)
    assert index.tolist() == [[0, 2, 4]]
    kept.sum().backward()
    assert x.grad[0, :, 0].tolist() == [1, 0, 1, 0, 1]


def test_scores():
    probs = torch.rand(2, 4, 6, 1 + 10).softmax(-1)
    assert text_to_video_scores(probs).shape == (2, 10)
    torch.testing.assert_close(text_to_video_scores(probs), probs[:, :, 0, 1:].mean(1))
    assert class_attention_scores(probs[:, :, 0, 1:]).shape == (2, 10)


@pytest.mark.parametrize("keep_rate", [70, 1.5, 0, -1, float("nan"), "0.7"])
def test_keep_rate_outside_0_1_is_an_error(keep_rate):
    x, scores = torch.randn(2, 11, 4), torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"keep_rate .*must be a share of the tokens"):
        keep_tokens(x, scores, keep_rate)


def test_scores_of_another_shape_are_an_error():
    with pytest.raises(ValueError, match=r"scores has shape \(2, 11\): one score per regional"):
        keep_tokens(torch.randn(2, 11, 4), torch.rand(2, 11), 0.5)
