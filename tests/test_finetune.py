"""Tests for fine-tuning: fine-tuning runs (train.py --task retrieval, qa) that resume. The
annotation variants of the retrieval benchmarks are tested in test_downstream_data.py, recall with
several right videos in test_metrics.py."""

import json

import pytest
import torch

# --------------------------------------------------------------------------------------------
# Fine-tuning runs (train.py --task ...)
# --------------------------------------------------------------------------------------------

def finetune_run(pretrained, out, *extra):
    import train
    return train.main(["--task", "retrieval", "--data", str(pretrained["root"] / "train.json"),
                       "--video-root", pretrained["video_root"], "--output-dir", str(out),
                       "--batch-size", "4", "--workers", "0", "--no-eval", *extra])


@pytest.mark.slow
def test_retrieval_finetuning_resumes_exactly(pretrained, tmp_path):
    init = ["--init", str(pretrained["checkpoint"])]
    whole = finetune_run(pretrained, tmp_path / "whole", *init, "--max-steps", "3", "--epochs", "2")
    first = finetune_run(pretrained, tmp_path / "split", *init, "--max-steps", "1",
                         "--epochs", "2")
    second = finetune_run(pretrained, tmp_path / "split", "--resume", "--max-steps", "3")
    assert len(first["losses"]) == 1 and len(second["losses"]) == 2
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]),
                               torch.tensor(whole["losses"]), rtol=1e-5, atol=1e-5)
    ckpt = torch.load(tmp_path / "split" / "retrieval_frames4" / "last.pt", weights_only=True)
    assert ckpt["run"]["task"] == "retrieval" and ckpt["step"] == 3
    assert not any("mlm" in name for name in ckpt["run"])
    # the tiny fine-tuning settings: 3e-4, the text encoder at pre-training's 1/20
    assert ckpt["run"]["lr"] == 3e-4 and ckpt["run"]["text_lr_scale"] == 0.05


@pytest.mark.slow
def test_finetuning_needs_a_checkpoint(pretrained, tmp_path):
    with pytest.raises(SystemExit, match="needs --init"):
        finetune_run(pretrained, tmp_path)


@pytest.mark.slow
def test_qa_finetuning_and_evaluation(pretrained, tmp_path):
    import eval as evaluation
    import train
    result = train.main(["--task", "qa", "--init", str(pretrained["checkpoint"]), "--data",
                         pretrained["train"], "--video-root", pretrained["video_root"],
                         "--test-data", pretrained["test"], "--answer-list",
                         pretrained["answer_list"], "--output-dir", str(tmp_path),
                         "--batch-size", "4", "--workers", "0", "--no-eval", "--max-steps", "2"])
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["config"]["keep_rate_m"] == 0.5 and ckpt["run"]["task"] == "qa"
    assert any(key.startswith("answer_decoder.") for key in ckpt["model"])
    out = evaluation.main(["--task", "qa", "--checkpoints-dir", str(tmp_path), "--workers", "0",
                           "--shuffle-frames", "--batch-size", "8"])
    assert out["questions"] == 20 and out["normal"]["questions"] == 20   # 4 clips x 5 questions
    assert set(out["normal"]["per_type"]) == {"first", "direction", "after"}
    assert {p["answer"] for p in out["normal"]["predictions"]} <= set(
        json.loads(open(pretrained["answer_list"]).read()))
    assert "shuffled" in out
    # under bf16 autocast (the end-of-stage check of a bf16 run) the answers are still ranked
    fast = evaluation.main(["--task", "qa", "--checkpoints-dir", str(tmp_path), "--workers", "0",
                            "--batch-size", "8", "--precision", "bf16"])
    assert fast["questions"] == 20 and {p["answer"] for p in fast["normal"]["predictions"]} <= set(
        json.loads(open(pretrained["answer_list"]).read()))
    with pytest.raises(SystemExit, match="qa checkpoint"):
        evaluation.main(["--checkpoint", str(result["checkpoint"]), "--workers", "0"])


def test_fine_tuning_crops_as_the_checkpoint_was_trained(tmp_path):
    """task_dataset takes the crop and flip of the model's config: tiny trains on whole frames,
    base on Singularity's crops with flips; test-time sets never flip."""
    import finetune
    from config import preset

    entries = [{"video": "a.mp4", "caption": "a red square moves up"}]
    for name, scale, flip in (("tiny", (1.0, 1.0), False), ("base", (0.5, 1.0), True)):
        config = preset(name)
        train = finetune.task_dataset("retrieval", entries, tmp_path, config, train=True)
        test = finetune.task_dataset("retrieval", entries, tmp_path, config, train=False)
        assert (train.crop_scale, train.flip, test.flip) == (scale, flip, False)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "retrieval", "qa"])
def test_each_task_trains_every_parameter_it_leaves_unfrozen(pretrained, task):
    """After freeze_unused every trainable parameter gets a gradient from the task's loss (what
    DistributedDataParallel waits for), and each frozen one would have got none."""
    import curriculum
    import data
    import downstream_data
    import finetune
    from checkpoint import load_checkpoint
    from config import SViTTConfig
    from pretrained import text_model_path

    ckpt = load_checkpoint(pretrained["checkpoint"])
    config = SViTTConfig.from_dict(ckpt["config"])
    if task != "pretrain":
        config = finetune.finetune_config(config, curriculum.stage(4, "tiny", task))
    model = finetune.model_class(task)(config, pretrained=False)
    finetune.load_initial_state(model, ckpt["model"], "checkpoint")
    annotation = pretrained["train"] if task == "qa" else str(pretrained["root"] / "train.json")
    dataset = (finetune.task_dataset(task, annotation, pretrained["video_root"], config, train=True)
               if task != "pretrain" else
               data.VideoTextDataset(annotation, pretrained["video_root"], frames=4,
                                     image_size=config.image_size, train=True))
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    collate_fn = downstream_data.task_collate(task, tokenizer, config, seed=0)
    batch = collate_fn([dataset[(0, i)] for i in range(2)])  # a batch of one clip's questions
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}

    def unreached():
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}

    assert unreached() == set(finetune.freeze_unused(model, task))
    assert unreached() == set()
