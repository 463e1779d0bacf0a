import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import data
import eval as evaluation
import synthetic
from model import SViTT, preset


def test_metrics_on_a_hand_made_matrix():
    # 3 videos; captions 0, 1 belong to video 0, caption 2 to video 1, caption 3 to video 2
    text_video = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[0.9, 0.1, 0.0],    # right at rank 1
                        [0.5, 0.5, 0.1],    # tie with video 1: counts against it -> rank 2
                        [0.2, 0.1, 0.3],    # its video 1 is last -> rank 3
                        [0.0, 0.0, 0.8]])   # rank 1
    m = evaluation.retrieval_metrics(sim, sim, text_video)
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
    assert evaluation.retrieval_metrics(constant, constant, text_video)["t2v_R@1"] == 0.0


def test_shuffled_order_is_a_real_permutation():
    for index in range(20):
        order = evaluation.shuffled_order(4, 0, index)
        assert sorted(order.tolist()) == [0, 1, 2, 3] and order.tolist() != [0, 1, 2, 3]
    assert evaluation.shuffled_order(1, 0, 0).tolist() == [0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    clips = synthetic.ensure_synthetic(folder / "synthetic", num_train=4, num_test=8, workers=1)
    torch.manual_seed(0)
    config = preset("tiny", frames=4)
    model = SViTT(config)
    path = folder / "frames4" / "last.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "step": 0, "epoch": 0,
                "run": {"data": clips["train"], "test_data": clips["test"],
                        "video_root": clips["video_root"]}}, path)
    return path


def run_eval(checkpoint, tmp_path, *extra):
    out = tmp_path / "result.json"
    result = evaluation.main(["--checkpoint", str(checkpoint), "--output", str(out), "--workers",
                              "0", *extra])
    assert json.loads(out.read_text())["videos"] == 8
    return result


def test_retrieval_and_overrides(checkpoint, tmp_path):
    base = run_eval(checkpoint, tmp_path)
    for ranking in ("vtc", "vtm"):
        assert set(base[ranking]) >= {"t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_mean", "v2t_R@1"}
    assert base["captions"] == 8 and base["sparsity"]["keep_rate_v"] == 0.7
    pruned = run_eval(checkpoint, tmp_path, "--keep-rate-v", "0.5", "--keep-rate-m", "1")
    assert pruned["sparsity"]["edges"] < base["sparsity"]["edges"]
    assert pruned["sparsity"]["keep_rate_v"] == 0.5
    dense = run_eval(checkpoint, tmp_path, "--dense")
    assert dense["sparsity"]["edges"] == dense["sparsity"]["dense_edges"]
    assert dense["sparsity"]["S"] == 0
    wider = run_eval(checkpoint, tmp_path, "--blocks", "1", "5", "14")
    assert wider["sparsity"]["edges"] > base["sparsity"]["edges"]


def test_shuffle_frames_changes_the_clips(checkpoint, tmp_path):
    model, config, run = evaluation.load_model(checkpoint, torch.device("cpu"))
    dataset = data.VideoTextDataset(run["test_data"], run["video_root"], frames=4,
                                    image_size=config.image_size,
                                    train=False)
    tokenizer = data.default_tokenizer()
    normal = evaluation.extract(model, dataset, tokenizer, "cpu", batch_size=4, workers=0, seed=0)
    shuffled = evaluation.extract(model, dataset, tokenizer, "cpu", batch_size=4, workers=0, seed=0,
                                  frame_order="shuffled")
    assert not torch.allclose(normal["video_feat"], shuffled["video_feat"], atol=1e-4)
    torch.testing.assert_close(normal["text_feat"], shuffled["text_feat"])
    result = run_eval(checkpoint, tmp_path, "--shuffle-frames", "--k", "4")
    assert "shuffled" in result and "shuffled_difference" in result


def test_pictures_and_sweep(checkpoint, tmp_path):
    result = run_eval(checkpoint, tmp_path, "--visualize", str(tmp_path / "pictures"),
                      "--num-pictures", "2",
                      "--sweep", "keep-rate-v", "--sweep-values", "1.0", "0.5", "--k", "2")
    assert len(result["pictures"]) == 2
    for picture in result["pictures"]:
        image = imread(picture)  # (height, width, RGBA) in [0, 1]
        # two strips of T = 4 frames, 1.6 x 3.6 inches a frame column at 100 dpi
        assert image.shape == (360, 640, 4)
        top, bottom = image[:180, :, :3], image[180:, :, :3]
        # top: the patches kept by visual pruning lit (q_v = 0.7 three times: about a third);
        # bottom: those kept by cross-modal pruning (q_m = 0.1 of them), the rest dimmed
        assert np.abs(top - bottom).mean() > 0.02
        assert bottom.mean() < top.mean()
    png = result["sweep"]["png"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["sweep"]["values"] == [1.0, 0.5]


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
    assert evaluation.group_accuracy(sim, text_video, groups) == pytest.approx(100 * 3 / 6)
    assert evaluation.group_accuracy(torch.zeros(7, 7), text_video, groups) == 0.0
    assert evaluation.group_accuracy(sim, text_video, [None] * 7) is None
    pairs = evaluation.group_pairs(text_video, groups)
    assert len(pairs) == 4 * 4 + 2 * 2


def test_reversed_frames_are_reported(checkpoint, tmp_path):
    result = run_eval(checkpoint, tmp_path, "--reverse-frames", "--k", "4")
    # the synthetic test split groups each scene's four clips: group accuracy for both rankings
    assert 0 <= result["vtc"]["group_acc"] <= 100 and 0 <= result["vtm"]["group_acc"] <= 100
    assert result["reversed_difference"]["vtc"]["group_acc"] == pytest.approx(
        result["vtc"]["group_acc"] - result["reversed"]["vtc"]["group_acc"])


def test_spread_within_and_across_groups():
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0],
                                                           [0.1, 1.0],
                                                           [1.0, 1.0]]), dim=-1)
    result = evaluation.spread(features, ["a", "a", "b", "b", None])
    assert result["within"] == pytest.approx(features[0] @ features[1])
    assert result["across"] == pytest.approx(((features[:2] @ features[2:4].T).mean()).item())
