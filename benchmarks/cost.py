"""The whole model's cost per clip, dense against sparse (the paper's Table 2).

For each T and each sparsity mode (dense, edge, node, hybrid, with the stage's values):
  - GFLOPs of a forward of f_v, f_t and one f_m pass, counted by torch.utils.flop_counter, and the
    same predicted from the tokens and edges of each layer (Eq. 17-18);
  - activation memory: the bytes autograd saves for backward in a training forward, with dense
    attention by the plain kernel (keeps the N x N softmax, as the paper's dense baseline) or as a
    fused kernel (FlashAttention) keeps it;
  - for a second, smaller preset on the device: the same, measured, and the forward and
    training-step times.
The preset's model is built on the meta device: shapes without numbers, so the base model at
T = 16 costs nothing to count.

    python benchmarks/cost.py [--preset base] [--timing-preset tiny] [--device cuda]
                              [--output rows.json]
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import curriculum  # noqa: E402
from config import preset  # noqa: E402
from model import SViTT  # noqa: E402

PAPER_TABLE2 = {  # (T, sparsity) -> (GFLOPs, training memory GB) of Table 2
    (4, "dense"): (139.9, 0.96), (4, "edge"): (135.9, 0.80),
    (4, "node"): (95.8, 0.61), (4, "hybrid"): (93.9, 0.54),
    (8, "dense"): (291.3, 3.14), (8, "edge"): (271.8, 1.57),
    (8, "node"): (197.6, 1.77), (8, "hybrid"): (166.4, 0.92),
    (16, "dense"): (627.8, 10.66), (16, "edge"): (543.6, 3.02),
    (16, "node"): (370.9, 4.39), (16, "hybrid"): (296.2, 1.57),
}


def sparsity_modes(config, frames):
    """Dense, edge, node and hybrid configs at `frames`, the sparse ones with the stage's values."""
    stage = curriculum.stage(frames, config.preset)
    base = replace(config, frames=frames)
    return {
        "dense": replace(base, block_size=None, keep_rate_v=1.0, keep_rate_m=1.0),
        "edge": replace(base, block_size=stage.block_size, local_blocks=stage.local_blocks,
                        random_blocks=stage.random_blocks, keep_rate_v=1.0, keep_rate_m=1.0),
        "node": replace(base, block_size=None, keep_rate_v=stage.keep_rate_v,
                        keep_rate_m=stage.keep_rate_m),
        "hybrid": replace(base, block_size=stage.block_size, local_blocks=stage.local_blocks,
                          random_blocks=stage.random_blocks, keep_rate_v=stage.keep_rate_v,
                          keep_rate_m=stage.keep_rate_m),
    }


def dummy_batch(config, batch_size, device):
    """A batch of random clips and full-length captions; every 7th token (~15%) is an MLM target.

    The MLM labels are real even for the meta device (they stay on the CPU there): the model picks
    the masked positions J by them (Eq. 31), and a mask cannot be read from a meta tensor."""
    L = config.text_len
    label_device = "cpu" if torch.device(device).type == "meta" else device
    labels = torch.full((batch_size, L), -100, dtype=torch.long, device=label_device)
    labels[:, 1::7] = torch.randint(1000, 2000, (batch_size, len(range(1, L, 7))),
                                    device=label_device)
    return {"video": torch.randn(batch_size, config.frames, 3, config.image_size,
                                 config.image_size, device=device),
            "input_ids": torch.randint(1000, 2000, (batch_size, L), device=device),
            "attention_mask": torch.ones(batch_size, L, dtype=torch.long, device=device),
            "mlm_input_ids": torch.randint(1000, 2000, (batch_size, L), device=device),
            "mlm_labels": labels,
            "video_id": torch.arange(batch_size, device=device)}


def inference_flops(model, config, device):
    """Forward FLOPs of one clip: video encoder, text encoder and one multimodal pass."""
    from torch.utils.flop_counter import FlopCounterMode
    batch = dummy_batch(config, 1, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tokens, _, _ = model.encode_video(batch["video"])
        states, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        model.fuse(states, batch["attention_mask"], tokens)
    return counter.get_total_flops()


def activation_bytes(model, config, device, plain_attention):
    """Bytes autograd saves for backward in a training forward, per clip (parameters excluded).

    plain_attention: attention by the math kernel, which keeps the softmax of Q K^T for backward
    (N x N when dense: what the paper's dense baseline did). Otherwise every
    scaled_dot_product_attention call is counted as a fused kernel (FlashAttention) keeps it: q, k,
    v, the output, one log-sum-exp per query, and the mask when it needs a gradient. The meta
    device always runs the math kernel, so the fused figure is counted this way, not measured.
    """
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, kept, total = set(), [], 0

    def count(t):
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen.add(key)
            kept.append(t)  # keeps the storage alive, so its address is not reused by another
            total += t.untyped_storage().nbytes()

    def pack(t):
        count(t)
        return t

    sdpa = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, **kwargs):
        # the math kernel's, uncounted
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
        for t in (q, k, v, out, q.new_empty(q.shape[:-1])):  # the log-sum-exp: one float per query
            count(t)
        if attn_mask is not None and attn_mask.requires_grad:
            count(attn_mask)
        return out

    batch_size = 2  # VTM needs a partner in the batch
    try:
        if not plain_attention:
            F.scaled_dot_product_attention = fused
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(dummy_batch(config, batch_size, device))
    finally:
        F.scaled_dot_product_attention = sdpa
    return total / batch_size


def predicted_gflops(model, config):
    """Forward GFLOPs of one clip predicted from the tokens and edges of each layer (Eq. 17-18).

    A layer of n tokens and e edges costs 2 n (4 d^2 + 2 d d_ff) in its linear maps and 4 e d in
    attention (Q K^T and P V); the text and multimodal layers are counted the same way, with the
    cross-attention's keys and values on the video tokens.
    """
    count = curriculum.count_config_edges(config)
    d, d_ff = config.vision_width, config.vision_width * 4
    w, w_ff = model.config.text_config["hidden_size"], model.config.text_config["intermediate_size"]
    n_t = config.text_len
    patches = count.visual_tokens[0] - 1
    flops = 2 * patches * 3 * config.patch_size ** 2 * d  # the linear patch embedding
    if config.space_time_conv:  # two 3 x 3 x 3 convolutions, d -> hidden -> d, per patch
        flops += 2 * patches * 2 * 27 * d * config.space_time_conv
    for n, e in zip(count.visual_tokens, count.visual):
        flops += 2 * n * (4 * d * d + 2 * d * d_ff) + 4 * e * d
    text_layer = 2 * n_t * (4 * w * w + 2 * w * w_ff) + 4 * n_t * n_t * w
    flops += config.text_layers * text_layer
    for n, e in zip(count.multimodal_tokens, count.multimodal):
        flops += text_layer + 2 * n_t * 2 * w * w + 2 * n * 2 * d * w + 4 * e * w
    return flops / 1e9


def step_times(models, device, repeats=5, batch_size=4):
    """Median seconds per clip of a forward (inference) and of a training step for each of
    `models` ({name: (model, config)}, the models already on `device`). The models take turns, so
    a change in the machine's load between them shows in all."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs = {}
    for name, (model, config) in models.items():
        batch = dummy_batch(config, batch_size, device)

        def forward(model=model, batch=batch):
            with torch.no_grad():
                tokens, _, _ = model.encode_video(batch["video"])
                states, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
                model.fuse(states, batch["attention_mask"], tokens)

        def train_step(model=model, batch=batch):
            model.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
        runs[name] = (forward, train_step)

    times = {name: ([], []) for name in models}
    for i in range(repeats + 1):
        for name, fns in runs.items():
            for fn, record in zip(fns, times[name]):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if i:  # the first run warms up
                    record.append((time.perf_counter() - start) / batch_size)
    return {name: (float(np.median(f)), float(np.median(t))) for name, (f, t) in times.items()}


def cost_table(preset_name, timing_preset, device, frames_list=(4, 8, 16), repeats=5):
    """Rows of Table 2 for a preset: GFLOPs (counted and predicted) and activation memory on the
    meta device; and for `timing_preset` on `device` ("none" to skip): GFLOPs, the activation
    bytes of a real training forward, and the measured forward and training-step times per clip.
    Returns the rows (dicts)."""
    rows = []
    for frames in frames_list:
        timing_models = {}
        for mode, config in sparsity_modes(preset(preset_name), frames).items():
            with torch.device("meta"):
                model = SViTT(config, pretrained=False)
            row = {"preset": preset_name, "frames": frames, "sparsity": mode,
                   "edges": curriculum.count_config_edges(config).total,
                   "gflops": inference_flops(model, config, "meta") / 1e9,
                   "gflops_predicted": predicted_gflops(model, config),
                   "memory_plain": activation_bytes(model, config, "meta", plain_attention=True),
                   "memory_fused": activation_bytes(model, config, "meta", plain_attention=False)}
            if timing_preset != "none":
                timing_config = sparsity_modes(preset(timing_preset), frames)[mode]
                torch.manual_seed(0)
                timing_model = SViTT(timing_config, pretrained=False).to(device)
                timing_models[mode] = (timing_model, timing_config)
                with torch.device("meta"):
                    meta_model = SViTT(timing_config, pretrained=False)
                row.update(timing_preset=timing_preset,
                           timing_gflops=inference_flops(meta_model, timing_config, "meta") / 1e9,
                           timing_memory=activation_bytes(timing_model, timing_config, device,
                                                          plain_attention=True))
            rows.append(row)
        if timing_models:
            times = step_times(timing_models, device, repeats)
            for row in rows[-len(timing_models):]:
                row["forward_s"], row["train_step_s"] = times[row["sparsity"]]
    return rows


def print_cost_table(rows):
    """Two tables: the preset's counted cost (Table 2) and, when timed, the timing preset's."""
    def ratio(row, key):
        dense = next(r for r in rows if r["frames"] == row["frames"] and r["sparsity"] == "dense")
        return row[key] / dense[key]

    print(f"Cost per clip of the {rows[0]['preset']} preset (Table 2), on the meta device. GFLOPs: "
          "forward of f_v, f_t and one f_m pass, counted by torch.utils.flop_counter; pred: the "
          "ratio predicted from the tokens and edges of each layer. Memory: bytes saved for "
          "backward in a training step, dense attention by the plain kernel (keeps the N x N "
          "softmax, as the paper's baseline) or a fused one (keeps q, k, v, the output, one "
          "log-sum-exp per query and the learned N x N bias). x: ratio to dense; paper: Table 2's.")
    print(f"{'T':>3} {'sparsity':>8} {'edges':>8} | {'GFLOPs':>7} {'x':>5} {'pred':>5} "
          f"{'paper':>5} | {'mem plain':>9} {'x':>5} {'paper':>5} | {'mem fused':>9} {'x':>5}")
    for row in rows:
        paper = PAPER_TABLE2.get((row["frames"], row["sparsity"]))
        paper_dense = PAPER_TABLE2.get((row["frames"], "dense"))
        pf = f"{paper[0] / paper_dense[0]:.2f}" if paper and row["preset"] == "base" else "-"
        pm = f"{paper[1] / paper_dense[1]:.2f}" if paper and row["preset"] == "base" else "-"
        print(f"{row['frames']:>3} {row['sparsity']:>8} {row['edges'] / 1e6:>7.2f}M | "
              f"{row['gflops']:>7.1f} {ratio(row, 'gflops'):>5.2f} "
              f"{ratio(row, 'gflops_predicted'):>5.2f} {pf:>5} | "
              f"{row['memory_plain'] / 2**30:>7.2f}GB {ratio(row, 'memory_plain'):>5.2f} {pm:>5} | "
              f"{row['memory_fused'] / 2**30:>7.2f}GB {ratio(row, 'memory_fused'):>5.2f}")
    if "forward_s" not in rows[0]:
        return
    print(f"\nMeasured per clip, {rows[0]['timing_preset']} preset, batch 4, median of the runs "
          "(the four sparsity modes take turns). memory: bytes saved for backward in a real "
          "training forward. step/flops: the step-time ratio over the GFLOPs ratio.")
    print(f"{'T':>3} {'sparsity':>8} | {'GFLOPs':>7} {'x':>5} | {'memory':>8} {'x':>5} | "
          f"{'forward':>8} {'x':>5} | {'step':>8} {'x':>5} | {'step/flops':>10}")
    for row in rows:
        print(f"{row['frames']:>3} {row['sparsity']:>8} | {row['timing_gflops']:>7.2f} "
              f"{ratio(row, 'timing_gflops'):>5.2f} | "
              f"{row['timing_memory'] / 2**20:>6.0f}MB {ratio(row, 'timing_memory'):>5.2f} | "
              f"{row['forward_s'] * 1e3:>6.1f}ms {ratio(row, 'forward_s'):>5.2f} | "
              f"{row['train_step_s'] * 1e3:>6.0f}ms {ratio(row, 'train_step_s'):>5.2f} | "
              f"{ratio(row, 'train_step_s') / ratio(row, 'timing_gflops'):>10.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=["base", "tiny"],
                   help="preset counted on the meta device")
    p.add_argument("--timing-preset", default="tiny", choices=["base", "tiny", "none"],
                   help="preset whose step time is measured on the device (none: skip)")
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16], help="frame counts T")
    p.add_argument("--device", default=None,
                   help="device of the timing preset (default: cuda when available)")
    p.add_argument("--output", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = cost_table(args.preset, args.timing_preset, device, tuple(args.frames))
    print_cost_table(rows)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
