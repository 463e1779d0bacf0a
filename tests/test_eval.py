import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import data
import eval as evaluation
import synthetic
from model import SViTT, preset


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bf16_evaluation_is_close_to_fp32_and_says_so(checkpoint, tmp_path):
    model, config, run = evaluation.load_model(checkpoint, torch.device("cpu"))
    dataset = data.VideoTextDataset(run["test_data"], run["video_root"], frames=4,
                                    image_size=config.image_size, train=False)
    tokenizer = data.default_tokenizer()
    common = dict(batch_size=4, workers=0, seed=0)
    fp32 = evaluation.extract(model, dataset, tokenizer, "cpu", **common)
    bf16 = evaluation.extract(model, dataset, tokenizer, "cpu", bf16=True, **common)
    for key in ("video_feat", "text_feat"):  # compared in fp32, computed in bf16
        assert bf16[key].dtype == torch.float32
        assert not torch.equal(bf16[key], fp32[key])
        assert torch.nn.functional.cosine_similarity(bf16[key], fp32[key]).min() > 0.98
    result = run_eval(checkpoint, tmp_path, "--precision", "bf16", "--k", "4")
    assert result["precision"] == "bf16" and run_eval(checkpoint, tmp_path)["precision"] == "fp32"
    assert 0 <= result["vtm"]["t2v_R@1"] <= 100 and "group_acc" in result["vtc"]


@pytest.mark.slow
def test_pictures_and_sweep(checkpoint, tmp_path):
    result = run_eval(checkpoint, tmp_path, "--visualize", str(tmp_path / "pictures"),
                      "--sweep", "keep-rate-v", "1.0", "0.5", "--k", "2")
    assert len(result["pictures"]) == evaluation.PICTURES
    assert result["sweep"]["values"] == [1.0, 0.5]
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


@pytest.mark.slow
def test_reversed_frames_are_reported(checkpoint, tmp_path):
    result = run_eval(checkpoint, tmp_path, "--reverse-frames", "--k", "4")
    # the synthetic test split groups each scene's four clips: group accuracy for both rankings
    assert 0 <= result["vtc"]["group_acc"] <= 100 and 0 <= result["vtm"]["group_acc"] <= 100
    assert result["reversed_difference"]["vtc"]["group_acc"] == pytest.approx(
        result["vtc"]["group_acc"] - result["reversed"]["vtc"]["group_acc"])
    # and, in the synthetic layout, how often a caption's clip beats each single rival of its scene
    for result_of in (result, result["reversed"]):
        for ranking in ("vtc", "vtm"):
            wins = result_of["rival_wins"][ranking]
            assert set(wins) == {"reversal", "swapped", "swapped_reversed"}
            assert all(0 <= value <= 100 for value in wins.values())
