"""Benchmark: block-sparse attention (Eq. 5-9) against dense scaled_dot_product_attention.

For T frames of 196 patches (224 px, 16 px patches) N = 196 T + 1 tokens. Prints, per T, the
median time of forward and of forward+backward for dense SDPA and for `sparse_attention`, the
speedup, the edge-count limit N / ((K_l + K_r) G + 1), the peak memory of one forward+backward above
its inputs (CUDA: the allocator's peak; CPU: the rise of the resident set, measured in a child
process) and the bytes autograd saves for backward (counted with saved-tensor hooks).

    python benchmarks/attention.py                      # CPU, float32, T = 4 8 16 32
    python benchmarks/attention.py --device cuda --dtype bfloat16
    python benchmarks/attention.py --frames 16 --profile runs/attention  # + operators, trace
    python benchmarks/attention.py --device cuda --dtype bfloat16 --impl flex  # FlexAttention

`--impl flex` runs the same edges through FlexAttention (`flex_sparse_attention` below), a
candidate to measure against the gather path on a GPU; its backward has no CPU kernel.

Each T runs in a fresh Python process with the allocator's default settings, as a project that
copies `sparse_attention.py` would run it, and the header prints the allocator.
`--keep-freed-memory` measures instead under glibc's mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GB),
which keeps freed memory in the process rather than returning it to the OS (and page-faulting it
in again).
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpu_speedups import keep_freed_memory
from sparse_attention import block_layout, sparse_attention


def flex_block_mask(num_regional, block_size, layout, tile=64):
    """The edge set of `sparse_attention` as a FlexAttention BlockMask over a packed sequence.

    FlexAttention computes whole tiles of the mask's blocks, and its block size must be a multiple
    of the kernel's tile, so each block of G regional tokens is padded to P = ceil(G / tile) tile
    rows (G = 56 -> 64) and the class token gets a block of its own after the N_b regional blocks.
    Query block n (< N_b) attends its K layout blocks and the class block (Eq. 7-9); the class
    block attends all N_b + 1 blocks (Eq. 9). Padding rows are masked out as keys and dropped as
    queries. Returns (block_mask, P).
    """
    from torch.nn.attention.flex_attention import BlockMask

    N, G, (num_blocks, K) = num_regional, block_size, layout.shape
    P, device = -(-G // tile) * tile, layout.device
    kv_indices = torch.zeros(num_blocks + 1, num_blocks + 1, dtype=torch.int32, device=device)
    kv_indices[:num_blocks, :K] = layout
    kv_indices[:num_blocks, K] = num_blocks
    kv_indices[num_blocks] = torch.arange(num_blocks + 1, device=device)
    kv_num_blocks = torch.full((num_blocks + 1,), K + 1, dtype=torch.int32, device=device)
    kv_num_blocks[num_blocks] = num_blocks + 1

    def mask_mod(b, h, q_idx, kv_idx):  # keys: real tokens only
        block, offset = kv_idx // P, kv_idx % P
        return torch.where(block == num_blocks, offset == 0,
                           (offset < G) & (block * G + offset < N))

    length = (num_blocks + 1) * P
    mask = BlockMask.from_kv_blocks(kv_num_blocks[None, None], kv_indices[None, None], BLOCK_SIZE=P,
                                    mask_mod=mask_mod, seq_lengths=(length, length))
    return mask, P


_compiled_flex = None


def flex_sparse_attention(q, k, v, block_size, layout, block_mask, padded_block):
    """`sparse_attention`'s output (Eq. 5-9) through FlexAttention with `flex_block_mask`'s mask."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    B, H, L, D = q.shape
    N, G, P, num_blocks = L - 1, block_size, padded_block, layout.shape[0]

    def pack(x):  # (B, H, 1 + N, D) -> (B, H, (N_b + 1) P, D)
        regional = F.pad(x[:, :, 1:], (0, 0, 0, num_blocks * G - N)).view(B, H, num_blocks, G, D)
        blocks = torch.cat([regional, x[:, :, None, :1].expand(B, H, 1, G, D)], dim=2)
        return F.pad(blocks, (0, 0, 0, P - G)).view(B, H, (num_blocks + 1) * P, D)

    out = _compiled_flex(pack(q), pack(k), pack(v), block_mask=block_mask, scale=D ** -0.5)
    out = out.view(B, H, num_blocks + 1, P, D)
    regional = out[:, :, :num_blocks, :G].reshape(B, H, num_blocks * G, D)[:, :, :N]
    return torch.cat([out[:, :, num_blocks, :1], regional], dim=2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while `fn` runs (activation memory)."""
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def measure(fns, device, repeats, grad=None):
    """Median seconds of each of `fns` (and of its backward with output gradient `grad`, when
    given) over `repeats` runs after a warm-up. The functions take turns, so a change in the
    machine's load between them shows in both."""
    times = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, fn_times in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            out = fn()
            if grad is not None:
                out.backward(grad)
            sync(device)
            if i:  # the first run warms up
                fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def inputs(frames, heads, dim, block_size, local_blocks, random_blocks, device="cpu",
           dtype=torch.float32):
    """q, k, v (1, heads, N, dim) with N = 196 T + 1, a dense output gradient (as a loss above the
    attention gives) and a block layout."""
    N = 196 * frames + 1
    q, k, v = (torch.randn(1, heads, N, dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    layout = block_layout(math.ceil((N - 1) / block_size), local_blocks, random_blocks,
                          device=device)
    return q, k, v, torch.randn_like(q), layout


def run(frames, *, heads, dim, block_size, local_blocks, random_blocks, device, dtype, repeats,
        impl):
    q, k, v, grad, layout = inputs(frames, heads, dim, block_size, local_blocks, random_blocks,
                                   device, dtype)
    N = q.shape[2]
    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    def sparse():
        return sparse_attention(q, k, v, block_size, layout, impl=impl)[0]
    if impl == "flex":
        mask, padded = flex_block_mask(N - 1, block_size, layout)

        def sparse():
            return flex_sparse_attention(q, k, v, block_size, layout, mask, padded)
    row = {"T": frames, "N": N, "limit": N / ((local_blocks + random_blocks) * block_size + 1)}
    with torch.no_grad():
        row["dense_fwd"], row["sparse_fwd"] = measure([dense, sparse], device, repeats)
    row["dense_fb"], row["sparse_fb"] = measure([dense, sparse], device, repeats, grad)
    for name, fn in (("dense", dense), ("sparse", sparse)):
        try:
            row[f"{name}_saved"] = saved_bytes(fn)[0]
        except RuntimeError as error:  # a compiled kernel may not take saved-tensor hooks
            print(f"T={frames} {name}: saved bytes not counted: {error}".splitlines()[0])
            row[f"{name}_saved"] = float("nan")
        q.grad = k.grad = v.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn().backward(grad)
            row[f"{name}_peak"] = torch.cuda.max_memory_allocated() - before
            q.grad = k.grad = v.grad = None
    return row


def peak_rss_child(args):
    """In a fresh process (--peak-child): one forward+backward, then print how far the resident
    set rose above what it was before the call (Linux: VmHWM reset through
    /proc/self/clear_refs)."""
    frames, which = args.peak_child
    local_blocks, random_blocks, block_size = args.blocks
    q, k, v, grad, layout = inputs(int(frames), args.heads, args.dim, block_size, local_blocks,
                                   random_blocks)

    def status(field):
        line = next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field))
        return int(line.split()[1]) * 1024
    Path("/proc/self/clear_refs").write_text("5")  # peak resident set := current
    before = status("VmRSS:")
    if which == "dense":
        F.scaled_dot_product_attention(q, k, v).backward(grad)
    else:
        sparse_attention(q, k, v, block_size, layout, impl=args.impl)[0].backward(grad)
    print(status("VmHWM:") - before)


def allocator(device, keep_freed):
    """The allocator this process runs under, in words."""
    if device.type == "cuda":
        return "PyTorch's CUDA caching allocator"
    name, version = platform.libc_ver()
    words = f"{name or 'libc'} {version} malloc".strip()
    words += (", mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GB)" if keep_freed
              else ", default settings")
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if k.startswith("MALLOC_") or k == "LD_PRELOAD"]
    return words + (f"; environment {' '.join(env)}" if env else "")


def row_in_child(frames, argv):
    """`run` for one T in a fresh process (--row-child): each row starts from a new allocator."""
    result = subprocess.run([sys.executable, __file__, *argv, "--row-child", str(frames)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def cpu_peak(frames, which, argv, runs=3):
    """Peak memory of one CPU forward+backward above its inputs: the median over `runs` child
    processes."""
    command = [sys.executable, __file__, *argv, "--peak-child", str(frames), which]
    peaks = [int(subprocess.run(command, capture_output=True, text=True, check=True)
                 .stdout.split()[-1])
             for _ in range(runs)]
    return statistics.median(peaks)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs=3, default=[1, 3, 56],
                        metavar=("K_l", "K_r", "G"))
    parser.add_argument("--impl", default="auto", choices=["auto", "bmm", "sdpa", "einsum", "flex"],
                        help="sparse_attention's implementation (auto: bmm for CPU training, "
                             "sdpa otherwise), or flex: FlexAttention (CUDA only)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile 3 sparse forward+backward calls at the largest T: print "
                             "the operators by time and write a trace to DIR for TensorBoard's "
                             "profiler plugin")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GB) in each timing "
                             "process")
    parser.add_argument("--peak-child", nargs=2, metavar=("T", "WHICH"), help=argparse.SUPPRESS)
    parser.add_argument("--row-child", type=int, metavar="T", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    local_blocks, random_blocks, block_size = args.blocks
    if args.peak_child:
        return peak_rss_child(args)
    if args.row_child:
        if args.keep_freed_memory:
            keep_freed_memory()
        row = run(args.row_child, heads=args.heads, dim=args.dim, block_size=block_size,
                  local_blocks=local_blocks, random_blocks=random_blocks, device=device,
                  dtype=dtype, repeats=args.repeats, impl=args.impl)
        return print(json.dumps(row))
    if args.impl == "flex" and device.type != "cuda":
        parser.error("--impl flex needs --device cuda: FlexAttention has no backward on the CPU")
    # peak memory: the CUDA allocator's; on the CPU the rise of the resident set in a child process
    # (Linux) with the allocator's default settings, so that freed blocks leave the resident set
    cpu_peaks = device.type == "cpu" and Path("/proc/self/clear_refs").exists()
    child_argv = ["--heads", str(args.heads), "--dim", str(args.dim),
                  "--blocks", *map(str, args.blocks), "--impl", args.impl]
    row_argv = [*child_argv, "--device", args.device, "--dtype", args.dtype,
                "--repeats", str(args.repeats)]
    if args.keep_freed_memory:
        row_argv.append("--keep-freed-memory")
    print(f"device {device}, {args.dtype}, B=1 H={args.heads} D={args.dim}, "
          f"(K_l, K_r, G) = {tuple(args.blocks)}, sparse impl {args.impl}, "
          f"median of {args.repeats} runs")
    print(f"allocator: {allocator(device, args.keep_freed_memory)}; each T in a fresh process")
    print(f"{'T':>3} {'N':>5} | {'fwd dense':>9} {'sparse':>8} {'x':>6} | "
          f"{'f+b dense':>9} {'sparse':>8} {'x':>6} | {'limit':>5} | "
          f"{'peak MB dense':>13} {'sparse':>7} | {'saved MB dense':>14} {'sparse':>7} "
          f"{'KB/token':>8}")
    for frames in args.frames:
        r = row_in_child(frames, row_argv)
        if cpu_peaks:
            r["dense_peak"], r["sparse_peak"] = (cpu_peak(frames, name, child_argv)
                                                 for name in ("dense", "sparse"))
        peaks = (f"{r['dense_peak'] / 2**20:>13.1f} {r['sparse_peak'] / 2**20:>7.1f}"
                 if "dense_peak" in r else f"{'-':>13} {'-':>7}")
        print(f"{r['T']:>3} {r['N']:>5} | "
              f"{r['dense_fwd'] * 1e3:>7.1f}ms {r['sparse_fwd'] * 1e3:>6.1f}ms "
              f"{r['dense_fwd'] / r['sparse_fwd']:>5.1f}x | {r['dense_fb'] * 1e3:>7.1f}ms "
              f"{r['sparse_fb'] * 1e3:>6.1f}ms {r['dense_fb'] / r['sparse_fb']:>5.1f}x | "
              f"{r['limit']:>5.1f} | "
              f"{peaks} | {r['dense_saved'] / 2**20:>14.1f} {r['sparse_saved'] / 2**20:>7.1f} "
              f"{r['sparse_saved'] / r['N'] / 2**10:>8.1f}")
    if args.profile:
        profile(max(args.frames), args.profile, heads=args.heads, dim=args.dim,
                block_size=block_size, local_blocks=local_blocks, random_blocks=random_blocks,
                device=device, dtype=dtype, impl=args.impl)


def profile(frames, trace_dir, *, heads, dim, block_size, local_blocks, random_blocks, device,
            dtype, impl):
    """Where the sparse attention's time goes: torch.profiler over 3 forward+backward calls."""
    q, k, v, grad, layout = inputs(frames, heads, dim, block_size, local_blocks, random_blocks,
                                   device, dtype)

    def step():
        sparse_attention(q, k, v, block_size, layout, impl=impl)[0].backward(grad)
    step()  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    on_trace_ready = torch.profiler.tensorboard_trace_handler(trace_dir)
    with torch.profiler.profile(activities=activities, on_trace_ready=on_trace_ready) as prof:
        for _ in range(3):
            step()
            sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nsparse attention at T={frames}, 3 forward+backward calls:")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    print(f"trace in {trace_dir} (tensorboard --logdir {trace_dir})")


if __name__ == "__main__":
    main()
