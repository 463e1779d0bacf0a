"""Benchmark: what `cpu_speedups.py` buys, the tiny preset's training step with and without it.

Variants, taking turns in one process on the same model and batch:
  all       the model as it is;
  plain-mlp the MLP keeps GELU's output for backward (plain autograd), no recomputation;
  torch-dropout  nn.Dropout's sampler everywhere and BERT attention by scaled_dot_product_attention
            with dropout_p (what PyTorch does without the CPU speed-ups);
  none      both.
Prints, per variant, the median seconds per clip of a training step (forward + backward) and the
bytes autograd saves for backward per clip. With --precision the variants are instead the model
as it is in fp32 and under bf16 autocast (`train.py --precision`; fast where the CPU has bf16
instructions, `cpu_speedups.native_bf16`).

    python benchmarks/speedups.py [--frames 4] [--batch-size 8] [--repeats 5] [--precision]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cpu_speedups  # noqa: E402
import model as model_module  # noqa: E402
from benchmarks.cost import dummy_batch  # noqa: E402
from config import preset  # noqa: E402


def plain_attention_with_dropout(q, k, v, mask, dropout):
    p = dropout.p if dropout.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def set_variant(model, *, recompute_gelu, cpu_dropout):
    """Switch the speed-ups of `model` on or off in place."""
    for module in model.modules():
        if isinstance(module, cpu_speedups.Mlp):
            if recompute_gelu:
                module.__dict__.pop("forward", None)
            else:
                module.forward = nn.Sequential.forward.__get__(module)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                kind = cpu_speedups.Dropout if cpu_dropout else nn.Dropout
                setattr(module, child_name, kind(child.p))
    model_module.attention_with_dropout = (cpu_speedups.attention_with_dropout if cpu_dropout
                                           else plain_attention_with_dropout)


def saved_bytes(model, batch):
    """Bytes autograd keeps for backward in one training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch)["loss"]
    del loss
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", action="store_true",
                        help="compare fp32 with bf16 autocast instead of the speed-ups")
    args = parser.parse_args(argv)
    cpu_speedups.keep_freed_memory()
    torch.manual_seed(0)
    config = preset("tiny", frames=args.frames)
    model = model_module.SViTT(config, pretrained=False).train()
    batch = dummy_batch(config, args.batch_size, "cpu")
    variants = {"all": (True, True, False), "plain-mlp": (False, True, False),
                "torch-dropout": (True, False, False), "none": (False, False, False)}
    if args.precision:
        variants = {"all": (True, True, False), "bf16": (True, True, True)}
    times = {name: [] for name in variants}
    memory = {}
    for i in range(args.repeats + 1):
        for name, (recompute_gelu, cpu_dropout, bf16) in variants.items():
            set_variant(model, recompute_gelu=recompute_gelu, cpu_dropout=cpu_dropout)
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(batch)["loss"]
            loss.backward()
            if i:  # the first round warms up
                times[name].append((time.perf_counter() - start) / args.batch_size)
            if i == 0:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    memory[name] = saved_bytes(model, batch) / args.batch_size
    set_variant(model, recompute_gelu=True, cpu_dropout=True)
    print(f"tiny preset, T={args.frames}, batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads, bf16 instructions: {cpu_speedups.native_bf16()}, "
          f"median of {args.repeats}: training step per clip, bytes saved for backward per clip")
    base = statistics.median(times["all"])
    for name in variants:
        step = statistics.median(times[name])
        print(f"  {name:14} {step * 1e3:7.1f} ms  x{step / base:5.2f}   "
              f"{memory[name] / 2**20:7.1f} MB")
    return times, memory


if __name__ == "__main__":
    main()
