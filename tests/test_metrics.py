import pytest
import torch

import metrics


def test_metrics_on_a_hand_made_matrix():
    # 3 videos; captions 0, 1 belong to video 0, caption 2 to video 1, caption 3 to video 2
    text_video = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[0.9, 0.1, 0.0],    # right at rank 1
                        [0.5, 0.5, 0.1],    # tie with video 1: counts against it -> rank 2
                        [0.2, 0.1, 0.3],    # its video 1 is last -> rank 3
                        [0.0, 0.0, 0.8]])   # rank 1
    m = metrics.retrieval_metrics(sim, sim, text_video)
    assert m["t2v_R@1"] == pytest.approx(50.0)
    assert m["t2v_R@5"] == pytest.approx(100.0)
    # video 0: best caption (0.9) beats every other caption -> rank 1; video 1: its caption scores
    # 0.1
    # in column 1, captions 1 (0.5) and 0 (0.1, a tie) are at least as high -> rank 3;
    # video 2: caption 3 (0.8) is the best of column 2 -> rank 1
    assert m["v2t_R@1"] == pytest.approx(200 / 3)
    assert m["v2t_R@5"] == pytest.approx(100.0)
    assert m["t2v_mean"] == pytest.approx((50 + 100 + 100) / 3)
    constant = torch.zeros(4, 3)
    assert metrics.retrieval_metrics(constant, constant, text_video)["t2v_R@1"] == 0.0


def test_group_accuracy_on_a_hand_made_matrix():
    # videos 0-3 form group "a", videos 4-5 group "b", video 6 none; caption i is of video i
    groups = ["a", "a", "a", "a", "b", "b", None]
    text_video = torch.arange(7)
    sim = torch.full((7, 7), -1.0)
    sim[0, :4] = torch.tensor([0.9, 0.1, 0.2, 0.3])    # right: its video beats the group
    sim[1, :4] = torch.tensor([0.5, 0.5, 0.1, 0.1])    # tie with video 0: counts against it
    sim[2, :4] = torch.tensor([0.1, 0.1, 0.2, 0.8])    # video 3 wins: wrong
    sim[3, :4] = torch.tensor([0.0, 0.0, 0.0, 0.1])    # right
    sim[4, 4:6] = torch.tensor([0.3, 0.2])              # right
    sim[5, 4:6] = torch.tensor([0.3, 0.2])              # wrong
    sim[:4, 4:] = 5.0                                   # other groups' videos do not count
    sim[6] = 0.0                                        # no group: not counted
    assert metrics.group_accuracy(sim, text_video, groups) == pytest.approx(100 * 3 / 6)
    assert metrics.group_accuracy(torch.zeros(7, 7), text_video, groups) == 0.0
    assert metrics.group_accuracy(sim, text_video, [None] * 7) is None
    pairs = metrics.group_pairs(text_video, groups)
    assert len(pairs) == 4 * 4 + 2 * 2


def test_spread_within_and_across_groups():
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0],
                                                           [0.1, 1.0],
                                                           [1.0, 1.0]]), dim=-1)
    result = metrics.spread(features, ["a", "a", "b", "b", None])
    assert result["within"] == pytest.approx(features[0] @ features[1])
    assert result["across"] == pytest.approx(((features[:2] @ features[2:4].T).mean()).item())


def test_token_spread_ignores_the_class_token_and_sees_collapse():
    # two clips of a class token and three regional tokens, d = 2
    collapsed = torch.tensor([[[9.0, -9.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]],
                              [[-5.0, 5.0], [3.0, 0.0], [3.0, 0.0], [3.0, 0.0]]])
    assert metrics.token_spread(collapsed) == 0.0  # clips differ, tokens within each do not
    varied = collapsed.clone()
    varied[0, 1:, 0] = torch.tensor([0.0, 1.0, 2.0])  # std 1 in one of two channels of clip 0
    assert metrics.token_spread(varied) == pytest.approx(0.25)


def test_recall_with_several_right_videos():
    # caption 0: right videos 0 and 2; caption 1: right video 1
    gt = torch.tensor([[True, False, True, False], [False, True, False, False]])
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.2],    # best right video (2) ranked 2nd
                           [0.3, 0.7, 0.2, 0.6]])   # right video first
    t2v = metrics.retrieval_metrics(scores, scores, gt)
    assert t2v["t2v_R@1"] == 50.0 and t2v["t2v_R@5"] == 100.0
    # video-to-text: video 0's caption (0.1) is below caption 1 (0.3), video 1's (0.7) below
    # caption 0 (0.9), video 2's (0.8) first; video 3 has no caption and is not a query
    assert t2v["v2t_R@1"] == pytest.approx(100 / 3)
    # one right video per caption reads the same as the index form
    single = torch.tensor([2, 1])
    assert metrics.retrieval_metrics(scores, scores, single) == metrics.retrieval_metrics(
        scores, scores, torch.nn.functional.one_hot(single, 4).bool())


def test_rival_wins_count_ties_as_half_and_skip_videos_without_a_rival():
    # videos 0 and 1 are each other's rival, video 2 has none; captions 0-3 of videos 0, 1, 0, 2
    text_video = torch.tensor([0, 1, 0, 2])
    rivals = {"reversal": torch.tensor([1, 0, -1])}
    sim = torch.tensor([[0.9, 0.1, 0.0],     # beats its rival: 1
                        [0.5, 0.5, 0.0],     # a tie: 1/2
                        [0.2, 0.3, 0.9],     # loses: 0
                        [0.0, 9.0, 0.1]])    # video 2 has no rival: not counted
    assert metrics.rival_wins(sim, text_video, rivals) == {
        "reversal": pytest.approx(100 * 1.5 / 3)}
    assert metrics.rival_wins(torch.zeros(4, 3), text_video, rivals)["reversal"] == 50.0
    assert metrics.rival_wins(sim, torch.tensor([2]), rivals) == {"reversal": None}
