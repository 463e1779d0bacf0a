import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from curriculum import count_edges
from model import RelativePositionBias, SViTT, drop_path, parameter_count, preset
from pretrained import text_model_path

SPARSITY = {  # (block_size, keep_rate_v, keep_rate_m)
    "dense": dict(block_size=None, keep_rate_v=1.0, keep_rate_m=1.0),
    "edge": dict(block_size=14, keep_rate_v=1.0, keep_rate_m=1.0),
    "node": dict(block_size=None, keep_rate_v=0.7, keep_rate_m=0.1),
    "hybrid": dict(block_size=14, keep_rate_v=0.7, keep_rate_m=0.1),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(text_model_path("all-MiniLM-L6-v2"))


def make_batch(tokenizer, config, batch_size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a red square moves left",
                "a blue circle moves up, then a green triangle moves right",
                "a yellow circle moves down"][:batch_size]
    enc = tokenizer(captions, padding="max_length", max_length=config.text_len, truncation=True,
                    return_tensors="pt")
    labels = torch.full_like(enc.input_ids, -100)
    labels[:, 2] = enc.input_ids[:, 2]  # one masked word per caption
    mlm_ids = enc.input_ids.clone()
    mlm_ids[:, 2] = tokenizer.mask_token_id
    size = config.image_size
    return {"video": torch.randn(batch_size, config.frames, 3, size, size, generator=g),
            "input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels, "video_id": torch.arange(batch_size)}


@pytest.mark.parametrize("frames", [1, 4, 8])
@pytest.mark.parametrize("mode", list(SPARSITY))
def test_forward_backward(tokenizer, mode, frames):
    torch.manual_seed(0)
    config = preset("tiny", frames=frames, **SPARSITY[mode])
    model = SViTT(config)
    out = model(make_batch(tokenizer, config))
    for name in ("loss", "loss_vtc", "loss_vtm", "loss_mlm"):
        assert torch.isfinite(out[name]), f"{name} is not finite"
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    # the record follows Eq. 17-19 for the same configuration
    edges = count_edges(frames, config.local_blocks, config.random_blocks, config.block_size,
                        config.keep_rate_v, config.keep_rate_m, patches_per_frame=config.grid ** 2,
                        text_len=config.text_len, prune_after=config.prune_after,
                        multimodal_prune_after=config.multimodal_prune_after)
    record = out["record"]
    assert record["visual_tokens"] == edges.visual_tokens
    assert record["visual"] == edges.visual
    assert record["multimodal_tokens"] == edges.multimodal_tokens
    assert record["multimodal"] == edges.multimodal


def test_dense_equals_hybrid_with_everything_kept(tokenizer):
    torch.manual_seed(0)
    dense_config = preset("tiny", frames=4, **SPARSITY["dense"])
    # 196 regional tokens in blocks of 14: 14 blocks; K_l + K_r = 14 covers them all
    hybrid_config = preset("tiny", frames=4, block_size=14, local_blocks=1, random_blocks=13,
                           keep_rate_v=1.0, keep_rate_m=1.0)
    dense, hybrid = SViTT(dense_config).eval(), SViTT(hybrid_config).eval()
    hybrid.load_state_dict(dense.state_dict())
    batch = make_batch(tokenizer, dense_config)
    with torch.no_grad():
        torch.manual_seed(1)  # the same VTM negatives for both
        a = dense(batch)
        torch.manual_seed(1)
        b = hybrid(batch, generator=torch.Generator().manual_seed(2))
        ta, _, fa = dense.encode_video(batch["video"])
        tb, _, fb = hybrid.encode_video(batch["video"])
    torch.testing.assert_close(tb, ta, atol=1e-4, rtol=1e-4)
    for name in ("loss_vtc", "loss_vtm", "loss_mlm"):
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4)
    # and sparsity does change the result when it is on
    sparse = SViTT(preset("tiny", frames=4, **SPARSITY["hybrid"])).eval()
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        tc, _, _ = sparse.encode_video(batch["video"])
    assert tc.shape[1] < ta.shape[1]


def test_relative_bias_follows_eq26():
    T, S, H = 2, 3, 2
    rel = RelativePositionBias(T, S, H)
    with torch.no_grad():
        rel.relative_position_bias_table.normal_()
        rel.cls_bias.normal_()
    N = T * S * S
    index = torch.arange(1 + N)[None]
    pos = torch.arange(1 + N)
    got = rel.bias(index)(pos[:, None], pos[None, :])[0]  # (H, 1 + N, 1 + N)
    coords = [(t, h, w) for t in range(T) for h in range(S) for w in range(S)]
    table = rel.relative_position_bias_table
    for i in range(1 + N):
        for j in range(1 + N):
            if i == 0 and j == 0:
                want = rel.cls_bias[2]
            elif i == 0:
                want = rel.cls_bias[0]
            elif j == 0:
                want = rel.cls_bias[1]
            else:
                (t, h, w), (t2, h2, w2) = coords[i - 1], coords[j - 1]
                want = table[t - t2 + T - 1, h - h2 + S - 1, w - w2 + S - 1]
            torch.testing.assert_close(got[:, i, j], want)
    # after pruning, the bias follows the kept tokens through their original numbers
    kept = torch.tensor([[0, 2, 7, 11]])
    sub = rel.bias(kept)(torch.arange(4)[:, None], torch.arange(4)[None, :])[0]
    torch.testing.assert_close(sub, got[:, kept[0]][:, :, kept[0]])


def test_presets_shapes():
    base, tiny = preset("base"), preset("tiny")
    assert (base.image_size, base.vision_width, base.vision_layers, base.vision_heads) == (224,
                                                                                           768, 12,
                                                                                           12)
    assert base.num_tokens == 785 and tiny.num_tokens == 197
    # a block is 2/7 of a frame
    assert base.block_size / base.grid ** 2 == tiny.block_size / tiny.grid ** 2
    with torch.device("meta"):
        model = SViTT(base, pretrained=False)
    # BEiT-B/16 with a relative bias table per block over (t, h, w) offsets at T = 4 (86.4M), and
    # BERT-base (110M) with cross-attention in its last 3 layers, VTC projections and the VTM head
    assert parameter_count(model.video_encoder) == 86_401_056
    assert parameter_count(model) == 203_402_333


@pytest.mark.parametrize("negative_videos,pairs", [(False, 2), (True, 3)])
def test_vtm_pairs(tokenizer, negative_videos, pairs):
    """Eq. 30: B positive pairs and B clips with a negative caption (2B); with
    vtm_negative_videos also B captions with a negative clip (3B), labelled 0."""
    torch.manual_seed(0)
    config = preset("tiny", frames=1, vtm_negative_videos=negative_videos)
    model = SViTT(config)
    rows = []
    model.vtm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    seen = []
    model.multimodal_layers[0].register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["video"]), with_kwargs=True)
    batch = make_batch(tokenizer, config)
    out = model(batch)
    assert rows == [pairs * 3]
    out["loss_vtm"].backward()
    video = seen[0]  # the VTM call's video tokens: own clips, own clips[, negative clips]
    own = video[:3]
    assert torch.equal(video[3:6], own)
    if negative_videos:  # each caption meets another clip, never its own
        for i in range(3):
            assert not torch.equal(video[6 + i], own[i])
            assert any(torch.equal(video[6 + i], own[j]) for j in range(3) if j != i)


def test_video_pooling_and_vtc_directions(tokenizer):
    torch.manual_seed(0)
    models = {p: SViTT(preset("tiny", frames=1, video_pooling=p)).eval() for p in ("cls", "mean")}
    models["mean"].load_state_dict(models["cls"].state_dict(), strict=False)
    assert set(models["mean"].state_dict()) - set(models["cls"].state_dict()) == {
        "video_encoder.pool_norm.weight", "video_encoder.pool_norm.bias"}
    with torch.no_grad():
        models["mean"].video_encoder.pool_norm.weight.normal_()
    batch = make_batch(tokenizer, models["cls"].config)
    before_norm = []
    for model in models.values():  # the tokens entering the final norm
        model.video_encoder.norm.register_forward_pre_hook(
            lambda module, args: before_norm.append(args[0]))
    with torch.no_grad():
        tokens, _, cls_feat = models["cls"].encode_video(batch["video"])
        _, _, mean_feat = models["mean"].encode_video(batch["video"])
    torch.testing.assert_close(before_norm[0], before_norm[1])
    proj = models["cls"].vision_proj
    torch.testing.assert_close(cls_feat, F.normalize(proj(tokens[:, 0]), dim=-1))
    pooled = models["mean"].video_encoder.pool_norm(before_norm[1][:, 1:].mean(1))
    torch.testing.assert_close(mean_feat, F.normalize(proj(pooled), dim=-1))
    assert not torch.allclose(cls_feat, mean_feat, atol=1e-3)
    # Eq. 28 sums the two directions; the authors' mean is half of it
    model = models["cls"]
    with torch.no_grad():
        summed = model(batch)["loss_vtc"]
        model.config.vtc_directions = "mean"
        halved = model(batch)["loss_vtc"]
    torch.testing.assert_close(halved * 2, summed)


def test_stochastic_depth_grows_over_the_layers():
    encoder = SViTT(preset("tiny", frames=1, drop_path=0.1), pretrained=False).video_encoder
    rates = [block.drop_path for block in encoder.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    x = torch.ones(1000, 3, 2)
    dropped = drop_path(x, 0.25, training=True)
    per_clip = dropped[:, 0, 0]
    # whole clips dropped, the kept ones rescaled by 1 / (1 - 0.25)
    assert torch.equal(dropped, per_clip[:, None, None].expand_as(x))
    assert torch.all((per_clip == 0) | torch.isclose(per_clip, torch.tensor(4 / 3)))
    assert 0.2 < (per_clip == 0).float().mean() < 0.3
    assert torch.equal(drop_path(x, 0.25, training=False), x)


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_video_features_depend_on_frame_order(mode):
    """Reversing a clip's frames changes its feature through the relative position bias over time
    (Eq. 26-27), and only through it: with a bias that ignores the time offset and no absolute
    positions, the dense model with the linear patch embedding sees a bag of frames."""
    torch.manual_seed(0)
    config = preset("tiny", frames=4, abs_pos_embed=False, space_time_conv=0, **SPARSITY[mode])
    model = SViTT(config, pretrained=False).eval()
    with torch.no_grad():
        for block in model.video_encoder.blocks:
            block.rel_pos.relative_position_bias_table.normal_(0, 1.0)
    size = config.image_size
    video = torch.randn(2, 4, 3, size, size, generator=torch.Generator().manual_seed(1))
    reversed_video = video.flip(1)

    def features(clips):
        with torch.no_grad():
            return model.encode_video(clips, torch.Generator().manual_seed(0))[2]

    forward, backward = features(video), features(reversed_video)
    # LayerScale (0.1) scales each block's share; float noise is below 1e-5
    assert (forward - backward).norm(dim=-1).min() > 1e-3
    if mode == "dense":
        with torch.no_grad():
            for block in model.video_encoder.blocks:
                table = block.rel_pos.relative_position_bias_table
                table.copy_(table[:1].expand_as(table))   # the same bias for every time offset
        torch.testing.assert_close(features(video), features(reversed_video), rtol=1e-4, atol=1e-5)


def test_space_time_conv_starts_as_the_patch_embedding_and_reads_order():
    """space_time_conv adds a residual 3 x 3 x 3 convolution to the patch tokens: zero at the start
    (the encoder is the plain patch embedding), and once trained, the tokens of a reversed clip
    are not the clip's tokens reversed in time. Its kernels do not depend on T."""
    from from_scratch import SpaceTimeConv

    torch.manual_seed(0)
    conv = SpaceTimeConv(width=32, hidden=16).eval()
    grid = torch.randn(2, 32, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(conv(grid), grid)
        conv.conv2.weight.normal_(std=0.05)   # as after some training
        forward, backward = conv(grid), conv(grid.flip(2))
    assert (forward.flip(2) - backward).abs().amax() > 1e-3
    # a still clip: the middle frames' outputs are the same either way (only order is new)
    still = grid[:, :, :1].expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(conv(still)[:, :, 1:3], conv(still.flip(2))[:, :, 1:3])
        assert conv(torch.cat([grid, grid], dim=2)).shape == (2, 32, 8, 7, 7)
    # in the encoder: at the start, the same clip summary as without it (the same other weights)
    config = preset("tiny", frames=4, space_time_conv=16)
    torch.manual_seed(0)
    plain_config = preset("tiny", frames=4, space_time_conv=0)
    plain = SViTT(plain_config, pretrained=False).video_encoder.eval()
    with_conv = SViTT(config, pretrained=False).video_encoder.eval()
    missing, unexpected = with_conv.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("space_time_conv.") for k in missing)
    video = torch.randn(1, 4, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # the random attention blocks drawn alike
        torch.testing.assert_close(with_conv(video, torch.Generator().manual_seed(3))[2],
                                   plain(video, torch.Generator().manual_seed(3))[2])


def test_space_time_conv_reads_two_frames_and_patches_either_way():
    """Two 3 x 3 x 3 convolutions: a token reads the tokens up to 2 frames and 2 patches away and
    none beyond."""
    from from_scratch import SpaceTimeConv

    def reach(offset):
        torch.manual_seed(0)
        conv = SpaceTimeConv(width=8, hidden=4).eval()
        grid = torch.randn(1, 8, 8, 9, 9)
        moved = grid.clone()
        moved[:, :, 3 + offset[0], 4 + offset[1], 4 + offset[2]] += 1.0
        with torch.no_grad():
            conv.conv2.weight.normal_(std=0.05)
            return (conv(moved) - conv(grid))[:, :, 3, 4, 4].abs().amax().item()

    assert reach((2, 2, 2)) > 1e-4
    assert reach((0, 3, 0)) == 0 and reach((3, 0, 0)) == 0


def test_sincos_pos_embed_tells_every_position_apart():
    from from_scratch import sincos_pos_embed
    table = sincos_pos_embed(4, 7, 128)   # (T H W, d), time-major
    assert table.shape == (4 * 49, 128)
    assert torch.cdist(table, table).add(torch.eye(len(table)) * 1e3).min() > 0.1
    grid = table.view(4, 49, 128)
    # the first quarter of the channels holds time alone: equal within a frame, different across
    assert torch.equal(grid[:, :1, :32].expand(-1, 49, -1), grid[:, :, :32])
    assert (grid[1:, 0, :32] - grid[:-1, 0, :32]).norm(dim=-1).min() > 0.1
    torch.manual_seed(0)
    model = SViTT(preset("tiny", frames=4), pretrained=False)
    torch.testing.assert_close(model.video_encoder.pos_embed[0, 1:], table)


def test_vtm_reads_the_multimodal_class_token(tokenizer):
    """VTM's head reads f_m's class token (Sec. A.3) even where VTC reads the mean of the text
    tokens (text_pooling="mean", the tiny preset)."""
    torch.manual_seed(0)
    config = preset("tiny", frames=1, text_pooling="mean")
    model = SViTT(config).eval()
    fused, head_input = [], []
    model.multimodal_layers[-1].register_forward_hook(lambda m, a, out: fused.append(out[0]))
    model.vtm_head.register_forward_hook(lambda m, a, out: head_input.append(a[0]))
    batch = make_batch(tokenizer, config)
    with torch.no_grad():
        model(batch)
    x = fused[0][:3]  # the positive pairs, with their own captions' masks
    mask = batch["attention_mask"][:, :, None].float()
    mean = (x * mask).sum(1) / mask.sum(1)
    assert torch.allclose(head_input[0][:3], x[:, 0])
    assert not torch.allclose(x[:, 0], mean)


def test_features_and_similarities_in_fp32_under_bf16_autocast(tokenizer):
    """VTC's logits (Eq. 29) at the temperature's bound 1/tau = 100: bf16 would round them to half
    a unit (its spacing near 100), so features and products are fp32 under any autocast."""
    torch.manual_seed(0)
    config = preset("tiny", frames=1)
    model = SViTT(config).eval()
    batch = make_batch(tokenizer, config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    a = F.normalize(torch.randn(6, config.embed_dim, dtype=torch.float64), dim=-1)
    # b close to a's first rows: positives' cosines near 1, logits near 100
    b = F.normalize(a[:5] + 0.05 * torch.randn(5, config.embed_dim, dtype=torch.float64), dim=-1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, video_feat = model.encode_video(batch["video"])
        _, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
        logits = model.similarity(a.float(), b.float())
    assert video_feat.dtype == text_feat.dtype == logits.dtype == torch.float32
    exact = (a @ b.T * 100).float()
    torch.testing.assert_close(logits, exact, rtol=0, atol=1e-4)
    bf16 = (a.bfloat16() @ b.bfloat16().T).float() * 100  # what autocast would have given
    assert (bf16 - exact).diagonal().abs().max() > 0.1
