import pytest
import torch

from curriculum import (
    STAGES,
    TINY_STAGES,
    Stage,
    check_curriculum,
    count_edges,
    expand,
    resize_pos_embed,
    resize_relative_bias,
    temporal_source,
)
from synthetic import Event, scene_clips


@pytest.mark.parametrize("frames,edges,sparsity", [(4, 1.48, 0.80), (8, 2.60, 0.91), (16, 4.61,
                                                                                      0.96)])
def test_table7(frames, edges, sparsity):
    s = STAGES[frames]
    e = count_edges(frames, s.local_blocks, s.random_blocks, s.block_size, s.keep_rate_v,
                    s.keep_rate_m)  # the default counts as Table 7 does
    assert round(e.total / 1e6, 2) == edges
    assert round(e.sparsity, 2) == sparsity


def test_table1_dense_and_node_rows():
    dense = count_edges(4, 1, 3, None, 1.0, 1.0)
    assert dense.total == dense.dense == 12 * 785 ** 2 + 3 * 32 * 785
    assert round(dense.total / 1e6, 2) == 7.47
    # node sparsity as the model prunes, q_m after the first multimodal layer
    assert round(count_edges(4, 1, 3, None, 0.7, 1.0, multimodal_prune_after=1).total / 1e6,
                 2) == 3.99
    assert round(count_edges(4, 1, 3, None, 0.7, 0.1, multimodal_prune_after=1).total / 1e6,
                 2) == 3.97


def test_token_counts_per_layer():
    e = count_edges(4, 1, 3, 56, 0.7, 0.1, multimodal_prune_after=1)
    assert e.visual_tokens == [785] * 4 + [550] * 3 + [385] * 3 + [270] * 2
    assert e.multimodal_tokens == [270, 27, 27]
    assert e.visual[0] == 785 * 4 * 56 and e.multimodal[1] == 27 * 32


def test_curriculum_constraints():
    check_curriculum(list(STAGES.values()))
    check_curriculum(list(TINY_STAGES.values()))
    with pytest.raises(ValueError, match="Eq. 15"):
        check_curriculum([STAGES[4], Stage(**{**STAGES[8].__dict__, "keep_rate_v": 0.8})])
    with pytest.raises(ValueError, match="Eq. 14"):
        check_curriculum([STAGES[8], STAGES[4]])
    with pytest.raises(ValueError, match="Eq. 16"):
        check_curriculum([STAGES[4], Stage(**{**STAGES[8].__dict__, "random_blocks": 7})])


def test_eq23_nearest_frames():
    assert temporal_source(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert temporal_source(8, 16).tolist() == [i // 2 for i in range(16)]
    assert temporal_source(1, 4).tolist() == [0, 0, 0, 0]


def test_pos_embed_inflation_and_resizing():
    hw, C = 6, 3
    pos2d = torch.randn(1, 1 + hw, C)
    pos3d = resize_pos_embed(pos2d, 1, 4)  # Eq. 22
    assert pos3d.shape == (1, 1 + 4 * hw, C)
    for t in range(4):
        torch.testing.assert_close(pos3d[0, 1 + t * hw: 1 + (t + 1) * hw], pos2d[0, 1:])
    pos4 = torch.randn(1, 1 + 4 * hw, C)
    pos8 = resize_pos_embed(pos4, 4, 8)  # Eq. 23
    torch.testing.assert_close(pos8[:, 0], pos4[:, 0])
    for t, src in enumerate([0, 0, 1, 1, 2, 2, 3, 3]):
        torch.testing.assert_close(pos8[0, 1 + t * hw: 1 + (t + 1) * hw],
                                   pos4[0, 1 + src * hw: 1 + (src + 1) * hw])


def test_relative_bias_resizing():
    table = torch.randn(7, 5, 5, 2)  # 4 frames: offsets -3..3
    new = resize_relative_bias(table, 4, 8)
    assert new.shape == (15, 5, 5, 2)
    torch.testing.assert_close(new[7], table[3])  # offset 0 stays offset 0
    torch.testing.assert_close(new[7 + 2], table[3 + 1])  # offset 2 at 8 frames is offset 1 at 4
    torch.testing.assert_close(new[0], table[0])  # the farthest offsets meet
    inflated = resize_relative_bias(table[3:4], 1, 4)  # Eq. 27 from a 2D table
    assert all(torch.equal(inflated[i], table[3]) for i in range(7))


def test_expand_touches_only_positions():
    sd = {"video.pos_embed": torch.randn(1, 1 + 4 * 6, 3),
          "video.blocks.0.attn.relative_position_bias_table": torch.randn(7, 3, 3, 2),
          "video.blocks.0.mlp.weight": torch.randn(4, 4)}
    new, message = expand(sd, 4, 8)
    assert new["video.pos_embed"].shape == (1, 1 + 8 * 6, 3)
    assert new["video.blocks.0.attn.relative_position_bias_table"].shape == (15, 3, 3, 2)
    assert new["video.blocks.0.mlp.weight"] is sd["video.blocks.0.mlp.weight"]
    assert "4 -> 8" in message and "video.pos_embed" in message


def test_tiny_batches_hold_whole_synthetic_scenes():
    # the grouped sampler keeps a group whole only where its size divides the batch: each stage of
    # the CPU preset must take whole scenes of the synthetic set (the clip, its reversal, the events
    # swapped, that reversed), so that a clip's own scene is in its batch
    scene = len(scene_clips((Event("red", "square", (0, 0), (0, 49)),
                             Event("blue", "circle", (60, 60), (11, 60)))))
    assert scene == 4
    for stage in TINY_STAGES.values():
        assert stage.batch_size % scene == 0, stage


def test_one_lookup_for_every_stage():
    """curriculum.stage holds Table 9's pre-training and fine-tuning columns (base) and their CPU
    scaling (tiny); a frame count without a stage names those there are."""
    from curriculum import NoStage, stage, stage_config
    assert stage(4) == STAGES[4] and stage(8, "tiny").batch_size == 32
    qa = stage(8, "base", "qa")  # Table 9, QA: 8 frames, (q_v, q_m) = (0.6, 0.5), lr 5e-5
    assert (qa.keep_rate_v, qa.keep_rate_m, qa.lr, qa.warmup_epochs) == (0.6, 0.5, 5e-5, 0)
    retrieval = stage(4, "base", "retrieval")  # the pre-training keep rates, lr 1e-5
    assert (retrieval.keep_rate_m, retrieval.lr, retrieval.batch_size) == (0.1, 1e-5, 64)
    assert stage(8, "tiny", "qa").text_lr_scale == 1.0  # the new decoder at the full rate
    with pytest.raises(NoStage, match="no qa stage of 6 frames for the tiny preset; stages exist "
                                      "for 4, 8, 16"):
        stage(6, "tiny", "qa")
    from config import preset
    config = stage_config(preset("tiny"), stage(8, "tiny"))
    assert (config.frames, config.keep_rate_v, config.block_size) == (8, 0.6, 14)
    dense = stage_config(preset("tiny"), stage(8, "tiny"), dense=True)
    assert (dense.block_size, dense.keep_rate_v, dense.keep_rate_m) == (None, 1.0, 1.0)
