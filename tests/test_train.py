import copy
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import cpu_speedups
import curriculum
import data
import synthetic
import train
from model import preset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A few synthetic clips (8 train, 4 test), made once for this file."""
    return synthetic.ensure_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=8,
                                      num_test=4, workers=1)


def run(clips, out, *extra):
    return train.main(["--data", clips["train"], "--video-root", clips["video_root"],
                       "--test-data", clips["test"],
                       "--output-dir", str(out), "--batch-size", "4", "--workers", "0",
                       "--no-eval", *extra])


@pytest.mark.slow
def test_expansion_from_4_to_8_frames(clips, tmp_path):
    run(clips, tmp_path, "--frames", "4", "--max-steps", "2")
    four = torch.load(tmp_path / "frames4" / "last.pt", weights_only=True)
    assert four["config"]["frames"] == 4 and four["step"] == 2
    # the checkpoint records the normalisation its frames had, for eval.py to apply
    assert four["config"]["image_mean"] == list(data.IMAGENET_MEAN)
    assert four["config"]["image_std"] == list(data.IMAGENET_STD)
    # lr 0: the 8-frame checkpoint holds the expanded weights as they were
    run(clips, tmp_path, "--resume", "--frames", "8", "--max-steps", "1", "--lr", "0")
    eight = torch.load(tmp_path / "frames8" / "last.pt", weights_only=True)
    config = eight["config"]
    assert config["frames"] == 8 and config["keep_rate_v"] == 0.6 and config["keep_rate_m"] == 0.1
    assert eight["step"] == 1  # a fresh schedule
    source = curriculum.temporal_source(4, 8)  # Eq. 23
    old, new = four["model"], eight["model"]
    pos_old = old["video_encoder.pos_embed"][0, 1:].reshape(4, -1,
                                                            old["video_encoder.pos_embed"].shape[-1])
    pos_new = new["video_encoder.pos_embed"][0, 1:].reshape(8, -1, pos_old.shape[-1])
    for t in range(8):
        torch.testing.assert_close(pos_new[t], pos_old[source[t]])
    torch.testing.assert_close(new["video_encoder.pos_embed"][0, 0],
                               old["video_encoder.pos_embed"][0, 0])
    tables = [k for k in old if k.endswith("relative_position_bias_table")]
    assert tables
    for key in tables:
        torch.testing.assert_close(new[key], curriculum.resize_relative_bias(old[key], 4, 8))
    others = [k for k in old if not k.endswith(("pos_embed", "relative_position_bias_table"))]
    assert set(others) == {k for k in new if not k.endswith(("pos_embed",
                                                             "relative_position_bias_table"))}
    for key in others:
        assert torch.equal(new[key], old[key]), f"{key} changed in the expansion"


@pytest.mark.slow
def test_resume_continues_exactly(clips, tmp_path):
    whole = run(clips, tmp_path / "whole", "--frames", "4", "--max-steps", "4", "--epochs", "2")
    first = run(clips, tmp_path / "split", "--frames", "4", "--max-steps", "2", "--epochs", "2")
    second = run(clips, tmp_path / "split", "--resume", "--max-steps", "4")
    assert len(whole["losses"]) == 4 and len(first["losses"]) == 2 and len(second["losses"]) == 2
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]),
                               torch.tensor(whole["losses"]),
                               rtol=1e-5, atol=1e-5)
    a = torch.load(tmp_path / "whole" / "frames4" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "frames4" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_of_another_shape_names_the_keys(clips, tmp_path):
    run(clips, tmp_path, "--frames", "4", "--max-steps", "1")
    path = tmp_path / "frames4" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["vision_width"] = 96  # a config that does not fit the weights
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=r"other shapes .*video_encoder\.cls_token"):
        run(clips, tmp_path, "--resume")
    with pytest.raises(SystemExit, match="holds a 'tiny' model"):
        run(clips, tmp_path, "--resume", "--preset", "base")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable SViTT checkpoint"):
        run(clips, tmp_path, "--resume")


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_batch_videos(clips, tmp_path):
    # a learning rate of 1e30 sends the weights to infinity after the first step
    with pytest.raises(SystemExit, match=r"loss is nan.*batch videos: .*\.mp4"):
        run(clips, tmp_path, "--frames", "4", "--max-steps", "4", "--lr", "1e30")


@pytest.mark.slow
def test_persistent_workers_draw_each_epochs_frames(clips):
    """The sampler's (epoch, index) pairs reach workers that outlive set_epoch: every epoch's items
    carry that epoch's seeds, the ones a loader without workers draws."""
    dataset = data.VideoTextDataset(clips["train"], clips["video_root"], frames=4, image_size=32,
                                    train=True)
    sampler = train.ResumableSampler(dataset, world=1, rank=0, seed=0, batch_size=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=1,
                                         persistent_workers=True, collate_fn=list)
    seeds = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        items = [item for batch in loader for item in batch]
        pairs = list(sampler)
        assert [item["seed"] for item in items] == [dataset.item_seed(i, e) for e, i in pairs]
        assert all(e == epoch for e, _ in pairs)
        torch.testing.assert_close(items[0]["video"], dataset[pairs[0]]["video"])
        seeds.append({i: item["seed"] for (_, i), item in zip(pairs, items)})
    assert all(seeds[0][i] != seeds[1][i] for i in seeds[0])  # a new epoch, new frames


def test_cosine_schedule_stops_at_its_floor():
    for floor in (0.0, 0.01):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = train.cosine_schedule(optimizer, warmup_steps=2, total_steps=10, floor=floor)
        rates = []
        for _ in range(12):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
        assert min(rates) == pytest.approx(floor) and rates[-1] == pytest.approx(floor)
        assert rates[2:10] == sorted(rates[2:10], reverse=True)


@pytest.mark.slow
def test_loader_masks_at_the_configs_rate(clips):
    dataset = data.VideoTextDataset(clips["train"], clips["video_root"], frames=1, image_size=32,
                                    train=True)
    for rate in (0.15, 0.5):
        config = replace(preset("tiny"), mlm_probability=rate)
        loader, _, _ = train.make_loader(dataset, config, per_rank=8, world=1, rank=0, seed=0,
                                         workers=0, device=torch.device("cpu"), task="pretrain")
        assert loader.collate_fn.mlm_probability == rate


def test_text_side_trains_at_its_own_learning_rate():
    from model import SViTT, preset
    model = SViTT(preset("tiny", frames=4))
    optimizer = train.make_optimizer(model, 1e-3, 0.02, text_lr_scale=0.05)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["embeddings.word_embeddings.weight"])] == pytest.approx(5e-5)
    assert lr_of[id(named["text_layers.0.attention.query.weight"])] == pytest.approx(5e-5)
    # f_m, its BERT layers included, learns fusion at the full rate
    for name in ("multimodal_layers.0.crossattention.query.weight",
                 "multimodal_layers.0.attention.query.weight", "multimodal_layers.2.output.weight"):
        assert lr_of[id(named[name])] == pytest.approx(1e-3)
    assert lr_of[id(named["mlm_head.predictions.transform.dense.weight"])] == pytest.approx(5e-5)
    assert lr_of[id(named["video_encoder.blocks.0.mlp.0.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["text_proj.weight"])] == pytest.approx(1e-3)
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_fused_adamw_steps_as_the_per_tensor_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = train.make_optimizer(model, 1e-2, 0.02)
    assert optimizer.defaults["fused"]
    loop = torch.optim.AdamW([{"params": [reference[0].weight], "weight_decay": 0.02},
                              {"params": [reference[0].bias, *reference[1].parameters()],
                               "weight_decay": 0.0}], lr=1e-2, foreach=False)
    for _ in range(3):
        x = torch.randn(4, 8)
        for m, opt in ((model, optimizer), (reference, loop)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[0].weight, start[0].weight)  # it did step


def test_bf16_autocast_step_keeps_fp32_weights_and_the_fp32_loss():
    """--precision: under bf16 autocast a training step's loss is the fp32 one up to bf16's
    rounding (not bitwise: the products really ran in bf16), and weights, gradients and the
    optimizer stay fp32."""
    from test_model import make_batch
    from transformers import AutoTokenizer

    from model import SViTT
    from pretrained import text_model_path
    tokenizer = AutoTokenizer.from_pretrained(text_model_path("all-MiniLM-L6-v2"))
    config = replace(preset("tiny"), frames=4, vision_layers=4, prune_after=[2])
    batch = make_batch(tokenizer, config)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = SViTT(config)
        model.train()
        optimizer = train.make_optimizer(model, 1e-4, 0.02)
        scheduler = train.cosine_schedule(optimizer, 0, 10)
        torch.manual_seed(1)  # the same dropout masks and VTM negatives
        losses[bf16], _ = train.train_step(model, optimizer, scheduler, batch,
                                           torch.device("cpu"), 0, bf16=bf16)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    for name in ("loss_vtc", "loss_vtm", "loss_mlm"):
        assert losses[True][name] == pytest.approx(losses[False][name], rel=0.05), name
    assert losses[True]["loss"] != losses[False]["loss"]


def test_precision_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    use_bf16 = cpu_speedups.use_bf16  # the rule train.py and eval.py share
    assert not use_bf16("fp32", cpu) and not use_bf16("fp32", cuda)
    assert use_bf16("bf16", cpu) and use_bf16("auto", cuda)
    assert use_bf16("auto", cpu) == cpu_speedups.native_bf16()



@pytest.mark.slow
def test_training_exits_with_its_loader_workers(clips, tmp_path):
    """train.py with a worker process exits once the stage is done, even where no garbage
    collection frees its loader (disabled here): the stage stops the workers itself."""
    code = ("import gc, sys; gc.disable(); sys.path.insert(0, {root!r}); import train; "
            "train.main({argv!r})").format(root=str(ROOT), argv=[
                "--data", clips["train"], "--video-root", clips["video_root"],
                "--output-dir", str(tmp_path), "--batch-size", "4", "--workers", "1",
                "--no-eval", "--frames", "4", "--max-steps", "1"])
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        returncode = process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        returncode = None
    assert returncode == 0
    assert torch.load(tmp_path / "frames4" / "last.pt", weights_only=True)["step"] == 1
