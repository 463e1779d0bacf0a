"""Temporal sparse expansion: stages, edge accounting and position inflation (Sec. 4, A.1).

SViTT is trained in stages of growing clip length T and growing sparsity (Fig. 3): a 4-frame
model is expanded to 8 frames, then 16, each stage with a lower keep rate. This file holds

* the stage tables of Tables 7 and 9, pre-training (`STAGES`, with the CPU preset's scaled
  values in `TINY_STAGES`) and fine-tuning (`FINETUNE_STAGES`), looked up by `stage`, and the
  constraints between stages (Eq. 14-16, `check_curriculum`);
* the edge and sparsity accounting of a configuration (Eq. 17-19, `count_edges`: Table 7's
  figures by default, the model's own count with `count_config_edges`);
* position inflation and temporal resizing as pure tensor functions: absolute position embedding
  from 2D to 3D and from T1 to T2 frames (Eq. 20-23, `resize_pos_embed`), and the relative position
  bias table along time (Eq. 26-27, `resize_relative_bias`);
* `expand(state_dict, old_frames, new_frames)`, which applies them to a checkpoint.

It works on numbers, tensors and state dicts and imports no other file of the project. Parameters
are found by name: a key ending in ``pos_embed`` is an absolute embedding (1, 1 + T H W, C) with the
class token first, a key ending in ``relative_position_bias_table`` is a table
(2T - 1, 2H - 1, 2W - 1, heads) indexed by (t' - t, h' - h, w' - w) offsets.

Run ``python curriculum.py`` to print every stage with its edges and sparsity.
"""
import math
from dataclasses import dataclass, replace

import torch

# --------------------------------------------------------------------------------------------
# Stages (Tables 7 and 9) and the curriculum constraints (Eq. 14-16)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    frames: int           # T, frames per clip
    local_blocks: int     # K_l, local key blocks per query block (Eq. 7)
    random_blocks: int    # K_r, random key blocks per query block (Eq. 8)
    block_size: int       # G, tokens per block
    keep_rate_v: float    # q_v, visual keep rate after layers 4, 7, 10 (Eq. 11)
    keep_rate_m: float    # q_m, cross-modal keep rate after the first multimodal layer (Eq. 13)
    epochs: int           # pre-training epochs of the stage
    warmup_epochs: float  # linear warm-up before the cosine schedule
    batch_size: int       # clips per optimizer step (all GPUs together)
    lr: float             # peak learning rate of AdamW
    weight_decay: float   # AdamW weight decay
    text_lr_scale: float = 1.0  # lr of the pretrained text encoder relative to lr


# Table 9, pre-training columns, with the sparsity of Table 7.
STAGES = {
    4: Stage(4, 1, 3, 56, 0.7, 0.1, epochs=10, warmup_epochs=1, batch_size=512, lr=3e-5,
             weight_decay=0.02),
    8: Stage(8, 1, 3, 56, 0.6, 0.1, epochs=10, warmup_epochs=1, batch_size=336, lr=1e-5,
             weight_decay=0.02),
    16: Stage(16, 1, 3, 56, 0.5, 0.1, epochs=10, warmup_epochs=1, batch_size=192, lr=5e-6,
              weight_decay=0.02),
}

# The CPU preset (112 px, 7 x 7 patches per frame): G = 14 keeps a block at 2/7 of a frame as
# G = 56 is of 14 x 14, the keep rates are the paper's. Its video encoder starts from scratch and
# the synthetic data set is small, so it trains a few epochs at a larger learning rate and a batch
# that a laptop holds; the learning rate still falls from stage to stage as in Table 9. Its text
# encoder is pretrained MiniLM and learns at 1/20 of that rate (see train.make_optimizer). Each of
# the 4- and 8-frame stages trains 7 epochs, 350 steps (docs/experiments.md: the 8-frame model
# reads the order of events only after a 4-frame stage of 7 epochs, not 4).
TINY_STAGES = {
    4: Stage(4, 1, 3, 14, 0.7, 0.1, epochs=7, warmup_epochs=0.2, batch_size=32, lr=5e-4,
             weight_decay=0.02, text_lr_scale=0.05),
    8: Stage(8, 1, 3, 14, 0.6, 0.1, epochs=7, warmup_epochs=0.1, batch_size=32, lr=2e-4,
             weight_decay=0.02, text_lr_scale=0.05),
    16: Stage(16, 1, 3, 14, 0.5, 0.1, epochs=2, warmup_epochs=0.1, batch_size=16, lr=1e-4,
              weight_decay=0.02, text_lr_scale=0.05),
}


def _finetune_stages(stages, epochs, batch_sizes, lr, keep_rate_m=None, text_lr_scale=None):
    """Fine-tuning stages from pre-training ones: the same frames, blocks and q_v (and q_m and the
    text encoder's learning-rate scale unless given), no warm-up, and the task's epochs, batch
    sizes ({frames: batch}) and learning rate."""
    return {frames: replace(stage, epochs=epochs, warmup_epochs=0, batch_size=batch_sizes[frames],
                            lr=lr, text_lr_scale=(stage.text_lr_scale if text_lr_scale is None
                                                  else text_lr_scale),
                            keep_rate_m=stage.keep_rate_m if keep_rate_m is None else keep_rate_m)
            for frames, stage in stages.items()}


# Table 9, fine-tuning columns: no warm-up, weight decay 0.02; retrieval lr 1e-5 with the
# pre-training keep rates; QA at 8 frames, (q_v, q_m) = (0.6, 0.5), lr 5e-5. Table 9 gives QA at 8
# frames only; 4 and 16 take that stage's q_v with QA's q_m.
# The CPU preset: a few epochs of the small synthetic splits at a larger rate, batches a laptop
# holds, no warm-up. Retrieval keeps pre-training's text rate (1/20: at the full rate the captions
# of a scene collapse together), 12 epochs at 3e-4; QA trains its new decoder, the text side
# included, at the full rate, 4 epochs at 2.5e-4 (docs/results.md).
FINETUNE_STAGES = {
    "base": {"retrieval": _finetune_stages(STAGES, 15, {4: 64, 8: 48, 16: 32}, 1e-5),
             "qa": _finetune_stages(STAGES, 5, {4: 128, 8: 128, 16: 128}, 5e-5,
                                    keep_rate_m=0.5)},
    "tiny": {"retrieval": _finetune_stages(TINY_STAGES, 12, {4: 32, 8: 32, 16: 16}, 3e-4),
             "qa": _finetune_stages(TINY_STAGES, 4, {4: 32, 8: 32, 16: 16}, 2.5e-4,
                                    keep_rate_m=0.5, text_lr_scale=1.0)},
}


class NoStage(ValueError):
    """A frame count without a stage in the table asked for."""


def stage(frames, preset="base", task="pretrain"):
    """The stage of `frames` clips: Table 9's pre-training column ("pretrain") or its fine-tuning
    columns ("retrieval", "qa") for `base`, their CPU scaling for `tiny`. A frame count without
    one raises NoStage, whose message lists those there are."""
    if task == "pretrain":
        table = TINY_STAGES if preset == "tiny" else STAGES
    else:
        table = FINETUNE_STAGES["tiny" if preset == "tiny" else "base"][task]
    if frames not in table:
        kind = "" if task == "pretrain" else f"{task} "
        raise NoStage(f"--frames {frames}: no {kind}stage of {frames} frames for the {preset} "
                      f"preset; stages exist for {', '.join(map(str, sorted(table)))}")
    return table[frames]


def stage_config(config, stage, dense=False):
    """A model config (a dataclass with SViTTConfig's fields) with a stage's frames and sparsity,
    or with none at all (`dense`: full attention, every token kept)."""
    if dense:
        return replace(config, frames=stage.frames, block_size=None, keep_rate_v=1.0,
                       keep_rate_m=1.0)
    return replace(config, frames=stage.frames, block_size=stage.block_size,
                   local_blocks=stage.local_blocks, random_blocks=stage.random_blocks,
                   keep_rate_v=stage.keep_rate_v, keep_rate_m=stage.keep_rate_m)


def check_curriculum(stages):
    """Eq. 14-16 between consecutive stages: T grows, q falls, (K_l + K_r) / T falls.

    `stages` is a sequence of objects with frames, keep_rate_v, local_blocks and random_blocks
    (a dense stage has keep rate 1). Raises ValueError naming the first pair that breaks a rule.
    """
    for j, (a, b) in enumerate(zip(stages, stages[1:]), start=1):
        if not a.frames < b.frames:  # Eq. 14
            raise ValueError(f"Eq. 14: stage {j + 1} has T={b.frames}, not more than stage {j}'s "
                             f"{a.frames}")
        if not a.keep_rate_v > b.keep_rate_v:  # Eq. 15
            raise ValueError(f"Eq. 15: stage {j + 1} keeps q={b.keep_rate_v}, not less than stage "
                             f"{j}'s {a.keep_rate_v}")
        ratio_a = (a.local_blocks + a.random_blocks) / a.frames
        ratio_b = (b.local_blocks + b.random_blocks) / b.frames
        if not ratio_a > ratio_b:  # Eq. 16
            raise ValueError(f"Eq. 16: stage {j + 1} has (K_l + K_r) / T = {ratio_b:.3f}, "
                             f"not less than stage {j}'s {ratio_a:.3f}")


# --------------------------------------------------------------------------------------------
# Edge accounting (Eq. 17-19)
# --------------------------------------------------------------------------------------------

def num_kept(num_tokens, keep_rate):
    """ceil(q N), N counting the class token (the rule of token_pruning.keep_tokens)."""
    return min(num_tokens, max(1, math.ceil(keep_rate * num_tokens - 1e-6)))


@dataclass
class EdgeCount:
    visual_tokens: list      # N_v^(l): tokens entering visual layer l
    visual: list             # |E_v^(l)| (Eq. 17)
    multimodal_tokens: list  # N_m^(l): video tokens entering multimodal layer l
    multimodal: list         # |E_m^(l)| (Eq. 18)
    total: int               # numerator of Eq. 19
    dense: int               # denominator of Eq. 19: L_v N_v^2 + L_m N_t N_v
    sparsity: float          # S of Eq. 19


def count_edges(frames, local_blocks, random_blocks, block_size, keep_rate_v, keep_rate_m, *,
                patches_per_frame=196, text_len=32, visual_layers=12, multimodal_layers=3,
                prune_after=(4, 7, 10), multimodal_prune_after=None):
    """Edges and sparsity of a SViTT configuration (Eq. 17-19).

    N = patches_per_frame * frames + 1 counts the class token. Visual layer l attends with
    N_v^(l) (K_l + K_r) G edges (Eq. 17), or N_v^(l)^2 when `block_size` is None (dense); after
    the layers in `prune_after` (1-based) the tokens become ceil(q_v N). A multimodal layer has
    N_m^(l) N_t cross-attention edges (Eq. 18); after layer `multimodal_prune_after` the video
    tokens become ceil(q_m N).

    The default (None) gives Table 7's figures (1.48M / 0.80 at T=4, 2.60M / 0.91 at T=8,
    4.61M / 0.96 at T=16): q_m shortens none of the counted layers. `multimodal_prune_after=1`
    counts as the model computes (it prunes after the first multimodal layer;
    `count_config_edges` passes the config's choice) and gives Table 1's node-sparsity rows
    (3.99M, 3.97M).

        count_edges(4, 1, 3, 56, 0.7, 0.1).total                            # 1.48M, Table 7
        count_edges(4, 1, 3, None, 0.7, 0.1, multimodal_prune_after=1).total  # 3.97M, Table 1

    Table 1's edge-only rows (2.14M for (1, 3, 56), 3.21M for (1, 5, 56)) do not follow from
    Eq. 17, which gives 2.19M and 3.24M for them; we keep the formula as the paper states it.

    When fewer than K_l + K_r blocks exist, a token attends to all of them (`block_layout`), so
    the count uses min(K_l + K_r, ceil((N - 1) / G)) blocks: the same number the model records.
    """
    tokens = patches_per_frame * frames + 1
    visual_tokens, visual = [], []
    for layer in range(1, visual_layers + 1):
        visual_tokens.append(tokens)
        if block_size is None:
            visual.append(tokens * tokens)
        else:
            width = min(local_blocks + random_blocks, math.ceil((tokens - 1) / block_size))
            visual.append(tokens * width * block_size)  # Eq. 17
        if layer in prune_after:
            tokens = num_kept(tokens, keep_rate_v)
    multimodal_tokens, multimodal = [], []
    for layer in range(1, multimodal_layers + 1):
        multimodal_tokens.append(tokens)
        multimodal.append(tokens * text_len)  # Eq. 18
        if layer == multimodal_prune_after:
            tokens = num_kept(tokens, keep_rate_m)
    full = patches_per_frame * frames + 1
    total = sum(visual) + sum(multimodal)
    dense = visual_layers * full ** 2 + multimodal_layers * text_len * full
    return EdgeCount(visual_tokens, visual, multimodal_tokens, multimodal, total, dense,
                     sparsity=1 - total / dense)  # Eq. 19


def count_config_edges(config):
    """count_edges for a model config (any object with the fields of config.SViTTConfig)."""
    return count_edges(config.frames, config.local_blocks, config.random_blocks, config.block_size,
                       config.keep_rate_v, config.keep_rate_m,
                       patches_per_frame=(config.image_size // config.patch_size) ** 2,
                       text_len=config.text_len, visual_layers=config.vision_layers,
                       multimodal_layers=config.multimodal_layers,
                       prune_after=tuple(config.prune_after),
                       multimodal_prune_after=config.multimodal_prune_after or None)


# --------------------------------------------------------------------------------------------
# Position inflation and temporal resizing (Eq. 20-23, 26-27)
# --------------------------------------------------------------------------------------------

def temporal_source(old_frames, new_frames):
    """Eq. 23: for each new frame t (1-based) the old frame floor(t T1 / T2 + 1/2), 0-based here.

    T1 = 1 is the inflation of Eq. 22 (every new frame copies the single 2D one).
    """
    t = torch.arange(1, new_frames + 1, dtype=torch.float64)
    return (torch.floor(t * old_frames / new_frames + 0.5).long() - 1).clamp(0, old_frames - 1)


def resize_pos_embed(pos_embed, old_frames, new_frames):
    """Eq. 20-23: absolute embedding (1, 1 + T1 H W, C) -> (1, 1 + T2 H W, C) by nearest frame.

    With old_frames = 1 this is the 2D-to-3D inflation of Eq. 22: p'_{t,h,w} = p_{h,w}.
    The class token's embedding p_cls is kept as it is.
    """
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    assert grid.shape[1] % old_frames == 0, \
        f"{grid.shape[1]} positions do not split into {old_frames} frames"
    grid = grid.reshape(grid.shape[0], old_frames, -1, grid.shape[-1])  # (1, T1, H W, C)
    grid = grid[:, temporal_source(old_frames, new_frames).to(grid.device)]  # (1, T2, H W, C)
    return torch.cat([cls, grid.flatten(1, 2)], dim=1)


def temporal_offset_source(old_frames, new_frames):
    """Eq. 26-27: for each new offset t' - t in [-(T2 - 1), T2 - 1], the index of its old offset.

    The offset is scaled by T1 / T2 and rounded to the nearest, as Eq. 23 scales frames:
    d -> sign(d) floor(|d| T1 / T2 + 1/2), clipped to the old range. With T1 = 1 every offset reads
    the single 2D table (inflation by duplication).
    """
    d = torch.arange(-(new_frames - 1), new_frames, dtype=torch.float64)
    old = torch.sign(d) * torch.floor(d.abs() * old_frames / new_frames + 0.5)
    return (old.long().clamp(-(old_frames - 1), old_frames - 1) + old_frames - 1)


def resize_relative_bias(table, old_frames, new_frames):
    """Eq. 26-27: table (2 T1 - 1, 2H - 1, 2W - 1, heads) -> (2 T2 - 1, 2H - 1, 2W - 1, heads)."""
    assert table.shape[0] == 2 * old_frames - 1, \
        f"table has {table.shape[0]} temporal offsets, {old_frames} frames need " \
        f"{2 * old_frames - 1}"
    return table[temporal_offset_source(old_frames, new_frames).to(table.device)]


def expand(state_dict, old_frames, new_frames):
    """Temporal expansion of a checkpoint from T1 to T2 frames (Sec. 4.2, A.1).

    Resizes every ``*pos_embed`` (Eq. 23) and ``*relative_position_bias_table`` (Eq. 26-27) along
    time; every other tensor is carried over unchanged (the transformer itself is length-agnostic).
    Returns (new_state_dict, message), the message one log line saying what was resized and how.
    """
    out, resized = {}, []
    for name, value in state_dict.items():
        if name.endswith("pos_embed"):
            out[name] = resize_pos_embed(value, old_frames, new_frames)
            resized.append(f"{name} {tuple(value.shape)}->{tuple(out[name].shape)}")
        elif name.endswith("relative_position_bias_table"):
            out[name] = resize_relative_bias(value, old_frames, new_frames)
            resized.append(name)
        else:
            out[name] = value
    tables = [r for r in resized if r.endswith("relative_position_bias_table")]
    embeds = [r for r in resized if not r.endswith("relative_position_bias_table")]
    source = temporal_source(old_frames, new_frames).tolist()
    message = (f"expand {old_frames} -> {new_frames} frames by nearest-neighbour resizing (Eq. 23: "
               f"new frame t reads old frame {source}): "
               f"{', '.join(embeds) or 'no absolute embedding'}; {len(tables)} relative position "
               f"bias tables {2 * old_frames - 1}->{2 * new_frames - 1} temporal offsets "
               f"(Eq. 26-27); {len(state_dict) - len(resized)} other tensors unchanged")
    return out, message


if __name__ == "__main__":
    dense = count_edges(4, None, None, None, 1.0, 1.0)
    print(f"dense T=4: {dense.total / 1e6:.2f}M edges")
    for preset, table in (("base", STAGES), ("tiny", TINY_STAGES)):
        print(f"{preset} preset stages (Tables 7, 9):")
        for s in table.values():
            e = count_edges(s.frames, s.local_blocks, s.random_blocks, s.block_size, s.keep_rate_v,
                            s.keep_rate_m, patches_per_frame=196 if preset == "base" else 49)
            print(f"  T={s.frames:2d} (K_l, K_r, G)=({s.local_blocks}, {s.random_blocks}, "
                  f"{s.block_size}) "
                  f"(q_v, q_m)=({s.keep_rate_v}, {s.keep_rate_m}): {e.total / 1e6:.2f}M edges, "
                  f"S={e.sparsity:.2f}; {s.epochs} epochs, batch {s.batch_size}, lr {s.lr:g}")
    check_curriculum(list(STAGES.values()))
    print("Eq. 14-16 hold for 4 -> 8 -> 16")
