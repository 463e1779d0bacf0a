"""What keeps a long training run going (Sec. A.3): flags checked before anything is built,
processes and random states, a sampler that resumes inside an epoch, the checkpoint's training
state, the run's log, the stop on SIGTERM/SIGINT and the end-of-stage evaluation.

`train.py` holds the training recipe and calls these:

    check_args(args)                                   # one-line errors for bad flags
    rank, world, device = setup_distributed("cuda")    # torchrun, or one process
    with StopRequest(checkpoint) as stop:              # SIGTERM/SIGINT: stop after the step
        ...
        if stop.agreed(world, device): ...             # all ranks stop after the same step
    print(resume_command(sys.argv[1:], checkpoint))    # python train.py --resume CHECKPOINT ...

Checkpoints themselves are written and read by `checkpoint.py`.
"""

import json
import logging
import math
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import curriculum
from checkpoint import save_checkpoint

log = logging.getLogger("train")  # the training run's log lines, as train.py writes them


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------

def check_args(args):
    """Flags outside what a run allows stop it before anything is built, each with one line that
    names the flag and what is allowed."""
    for flag, value in (("--batch-size", args.batch_size), ("--epochs", args.epochs),
                        ("--max-steps", args.max_steps), ("--save-every", args.save_every)):
        if value is not None and value <= 0:
            raise SystemExit(f"{flag} {value}: must be a positive whole number")
    if args.workers is not None and args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: must be 0 (load in the main process) or more")
    for flag, value in (("--lr", args.lr), ("--text-lr-scale", args.text_lr_scale)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"{flag} {value}: must be a finite number, 0 or more")
    if (args.preset == "base" and args.resume is None and args.task == "pretrain"
            and not args.beit):
        raise SystemExit("--preset base starts its video encoder from BEiT (Sec. 5.1): give "
                         "--beit FOLDER, a transformers BEiT such as "
                         "microsoft/beit-base-patch16-224-pt22k-ft22k, or --beit none to train it "
                         "from random weights")
    if args.frames is not None and args.resume is None and args.task == "pretrain":
        try:  # resumed and fine-tuning runs: in build()
            curriculum.stage(args.frames, args.preset or "tiny")
        except curriculum.NoStage as error:
            raise SystemExit(str(error)) from None
    if args.video_root is not None and not Path(args.video_root).is_dir():
        raise SystemExit(f"--video-root {args.video_root}: no such folder")
    for flag, path in (("--data", args.data), ("--test-data", args.test_data),
                       ("--init", args.init), ("--answer-list", args.answer_list)):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file")
    check_writable(args.output_dir)


def check_writable(folder):
    """--output-dir exists (made if needed) and takes new files."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SystemExit(f"--output-dir {folder}: cannot write checkpoints there "
                         f"({error.strerror or error})") from None


# --------------------------------------------------------------------------------------------
# Processes and seeds
# --------------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world_size, device). Under torchrun: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def seed_everything(seed, rank=0):
    """torch, NumPy and Python's random seeded with seed + rank, as the authors' code seeds: under
    torchrun each process draws its own dropout masks and random attention blocks (Eq. 8), where
    one seed for all would repeat them in every process. Rank 0 draws what a single process
    would; DistributedDataParallel starts every process from rank 0's weights."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def rng_state():
    """torch, CUDA, NumPy and Python random states, as tensors and plain types."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
            "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def all_rng_states(world):
    """rng_state() of every process, in rank order (one all_gather_object under torchrun)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Batches that resume inside an epoch
# --------------------------------------------------------------------------------------------

def grouped_order(groups, seed, epoch):
    """Item indices with the items of each group next to each other: the groups in a random
    order, the items of a group in a random order (both drawn from seed and epoch)."""
    rng = np.random.default_rng([seed, epoch])
    members = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    keys = list(members)
    order = []
    for k in rng.permutation(len(keys)):
        order.extend(int(i) for i in rng.permutation(members[keys[k]]))
    return order


class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler's order (seeded by seed and epoch, one shard per rank) that can start
    `skip` batches into an epoch, so a resumed run sees the batches it had not seen. It yields
    (epoch, index) pairs: the DataLoader's workers persist across epochs and learn the epoch,
    which seeds each item's frames, from the pair.

    With `groups` (one label per item, from the annotation's "group" key) every batch holds the
    items of whole groups, which are each other's hard negatives in VTC (Eq. 28-29): the groups
    are shuffled, each step's batch of all ranks is a run of consecutive items of that order, and
    rank r takes the r-th slice of it. A group stays whole when its size divides the per-rank
    batch (the synthetic scenes: groups of 4, batches of 32); other sizes are split where a batch
    ends. Without groups the order is DistributedSampler's, as before."""

    def __init__(self, dataset, *, world, rank, seed, batch_size, groups=None):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.groups, self.world, self.rank, self.seed = groups, world, rank, seed
        self.batch_size = batch_size
        self.epoch = self.skip = 0

    @property
    def num_samples(self):
        """Items of one epoch on this rank (whole batches of every rank when grouping)."""
        if self.groups is None:
            return len(self.inner)
        return len(self.groups) // (self.batch_size * self.world) * self.batch_size

    def set_epoch(self, epoch, skip_batches=0):
        self.inner.set_epoch(epoch)
        self.epoch = epoch
        self.skip = skip_batches * self.batch_size

    def indices(self):
        if self.groups is None:
            return list(self.inner)
        order = grouped_order(self.groups, self.seed, self.epoch)
        step = self.batch_size * self.world
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [i for start in range(0, self.num_samples // self.batch_size * step, step)
                for i in order[start:start + step][mine]]

    def __iter__(self):
        return iter([(self.epoch, index) for index in self.indices()[self.skip:]])

    def __len__(self):
        return self.num_samples - self.skip


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGTERM and SIGINT to the main process, which stops after its
    step (StopRequest) and then shuts them down."""
    for signum in StopRequest.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def close_loader(loader):
    """Stop the persistent workers of `loader` now (train.py does it when a stage ends, whether
    it finished or failed).

    They ignore SIGTERM (`ignore_stop_signals`), and at exit Python's multiprocessing terminates
    daemonic workers with SIGTERM and then waits for them: a loader still alive then (held by a
    reference cycle until a garbage collection that never came) kept a finished run from exiting.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()  # sends each worker its stop sentinel and joins it
    loader._iterator = None


# --------------------------------------------------------------------------------------------
# Checkpoint state
# --------------------------------------------------------------------------------------------

def training_state(model, optimizer, scheduler, *, step, epoch, config, run, rng=None):
    """The checkpoint of a run: everything a true resume needs to continue exactly. `rng`: the
    random states of each of its processes (all_rng_states), by default this one's alone."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
            "rng": [rng_state()] if rng is None else rng, "config": config.to_dict(), "run": run}


class StageCheckpoint:
    """A stage's `last.pt`: `save(step, epoch, reason)` is called by every process at the same
    steps (the random states of all are gathered) and written by the main process, atomically
    (checkpoint.save_checkpoint); a failed write stops the run with one line that says which
    checkpoint is left."""

    def __init__(self, path, *, model, optimizer, scheduler, config, run, rank, world):
        self.path, self.rank, self.world = path, rank, world
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config, self.run = config, run
        self.saved_step = None

    def save(self, step, epoch, reason):
        rng = all_rng_states(self.world)  # a collective: every process takes part
        if self.rank != 0:
            return
        try:
            save_checkpoint(self.path, training_state(
                self.model, self.optimizer, self.scheduler, step=step, epoch=epoch,
                config=self.config, run=self.run, rng=rng))
        except OSError as error:
            kept = (f"{self.path} (step {self.saved_step}) is unchanged" if self.saved_step
                    else "no checkpoint of this run was written")
            raise SystemExit(f"step {step}: cannot write the {reason} checkpoint {self.path} "
                             f"({error.strerror or error}); {kept}") from None
        self.saved_step = step


def restore_training_state(ckpt, optimizer, scheduler, *, rank=0, world=1, seed=0,
                           log_line=log.info):
    """Optimizer, schedule and this process's random states of a true resume; -> (step, epoch).

    A run resumed with another number of processes cannot continue the random streams: each
    process then seeds from (seed, step) and its rank, and a line says so. (Checkpoints of
    earlier versions hold one process's random states, not a list, and may hold a 'scaler' entry,
    which is not needed and not read.)"""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        log_line(f"the checkpoint holds the random states of {len(states)} process(es), this run "
                 f"has {world}: each process seeds from --seed, the step and its rank, so the "
                 f"run does not continue exactly as an unbroken one")
        fresh = int(np.random.SeedSequence([seed, ckpt["step"]]).generate_state(1)[0]) % 2**31
        seed_everything(fresh, rank)
    return ckpt["step"], ckpt["epoch"]


# --------------------------------------------------------------------------------------------
# Logging, profiling, stopping
# --------------------------------------------------------------------------------------------

class RunLog:
    """Log lines, a progress bar, TensorBoard scalars, the count of skipped clips and the
    profiler's steps, written by the main process only."""

    def __init__(self, main_process):
        self.main = main_process
        self.writer = self.profiler = None
        self.losses, self.step_times, self.skipped, self.skipped_files = [], [], 0, set()
        logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                            format="%(message)s")

    def line(self, text):
        if self.main:
            log.info(text)

    def open(self, folder, profile=False):
        """TensorBoard logs in folder/tb; with `profile`, a torch.profiler trace of a few steps
        in folder/profile for TensorBoard's profiler plugin."""
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(Path(folder) / "tb")
            if profile:
                self.profile_dir = Path(folder) / "profile"
                self.profiler = start_profiler(self.profile_dir)

    def progress(self, loader, total, desc):
        from tqdm import tqdm
        self.tick = time.perf_counter()
        self.bar = tqdm(loader, total=total, disable=not self.main, desc=desc, dynamic_ncols=True)
        return self.bar

    def step(self, step, values, *, batch, clips, lr, edges, record):
        """After a step: its losses (`values`), the clips of `batch` the loader could not read
        and replaced (data.py), time, TensorBoard scalars."""
        self.skipped += len(batch["skipped"])
        self.skipped_files.update(batch["skipped"])
        if self.profiler is not None:
            self.profiler.step()
        now = time.perf_counter()
        self.step_times.append(now - self.tick)
        clips_per_s = clips / (now - self.tick)
        self.tick = now
        self.losses.append(values["loss"])
        if not self.main:
            return
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", clips_s=f"{clips_per_s:.1f}")
        scalars = {f"train/{name}": value for name, value in values.items()}
        scalars.update({"train/lr": lr, "train/clips_per_s": clips_per_s,
                        "train/skipped_clips": self.skipped, "sparsity/edges": edges.total,
                        "sparsity/S": edges.sparsity})
        for layer, tokens in enumerate(record["visual_tokens"], start=1):
            scalars[f"tokens/visual_{layer:02d}"] = tokens
        for layer, tokens in enumerate(record["multimodal_tokens"], start=1):
            scalars[f"tokens/multimodal_{layer}"] = tokens
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self, *, frames, step, epoch, epochs, steps_per_epoch, device=None):
        if self.profiler is not None:
            self.profiler.stop()
            self.line(f"profiler trace in {self.profile_dir} "
                      f"(tensorboard --logdir {self.profile_dir})")
        if self.step_times:
            first, *rest = self.step_times  # the first step also warms up: apart
            times = f"median of the {len(rest)} after it {statistics.median(rest):.3f} s, " \
                if rest else ""
            self.line(f"step time: first {first:.3f} s, {times}peak memory {peak_memory(device)}")
        if self.skipped:
            self.line(f"skipped {self.skipped} unreadable clips ({len(self.skipped_files)} "
                      f"files): " + ", ".join(sorted(self.skipped_files)[:20]))
        if self.losses:
            tail = self.losses[-min(len(self.losses), steps_per_epoch):]
            self.line(f"stage T={frames} stopped at step {step} (epoch {epoch}/{epochs}); "
                      f"mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.3f}")
        if self.writer is not None:
            self.writer.close()


def peak_memory(device=None):
    """The run's peak memory as text: the GPU's peak allocation on CUDA, else the process's
    peak resident set (what the operating system saw; DataLoader workers not included)."""
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA, allocated)"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


class StopRequest:
    """SIGTERM (what a cluster scheduler sends before preempting a job) and SIGINT (Ctrl-C): the
    first asks the training loop to finish its step, write the checkpoint and stop; a second
    stops at once. Under torchrun the ranks agree on the step (`agreed`)."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.handle)
                             for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None

    def handle(self, signum, frame):
        # no printing here: the signal may arrive while the progress bar writes to stderr
        if self.signum is not None:
            raise SystemExit(f"{signal.Signals(signum).name} again: stopped at once; the last "
                             f"checkpoint written is {self.checkpoint}")
        self.signum = signum

    def agreed(self, world, device):
        """Whether to stop after this step: a signal on any rank (one MAX all-reduce a step
        under torchrun), so that all ranks stop after the same step."""
        if world == 1:
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag.item()) or None
        return self.signum is not None


def resume_command(argv, checkpoint):
    """The command line that continues a stopped run: its own flags, --resume CHECKPOINT."""
    kept, skip = [], False
    for token in argv:
        if skip and not token.startswith("-"):
            skip = False
            continue
        skip = token == "--resume"
        if not skip and not token.startswith("--resume="):
            kept.append(token)
    return shlex.join(["python", "train.py", "--resume", str(checkpoint), *kept])


def start_profiler(folder):
    """torch.profiler over a few steps, traced for TensorBoard's profiler plugin."""
    profiler = torch.profiler.profile(
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(folder)),
        record_shapes=True, profile_memory=True, with_stack=False)
    profiler.start()
    return profiler


# --------------------------------------------------------------------------------------------
# The end-of-stage evaluation
# --------------------------------------------------------------------------------------------

def evaluate_stage(checkpoint_path, test_ann, video_root, device, task_args=()):
    """Zero-shot retrieval on the test split, by eval.py in its own process; saved beside the
    checkpoint. A quick check: VTM re-scores the top 16 of each query (`python eval.py`: 128).
    A failed evaluation stops with one line (eval.py's last) and keeps the checkpoint."""
    output = Path(checkpoint_path).with_name("qa.json" if "qa" in task_args else "retrieval.json")
    command = [sys.executable, str(Path(__file__).with_name("eval.py")), "--checkpoint",
               str(checkpoint_path), "--output", str(output), "--k", "16", *task_args,
               "--data", str(test_ann), "--video-root", str(video_root)]
    if device:
        command += ["--device", device]
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode != 0:
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise SystemExit(f"the end-of-stage evaluation failed ({reason}); the checkpoint "
                         f"{checkpoint_path} is kept: evaluate it with python eval.py "
                         f"--checkpoint {checkpoint_path}")
    sys.stderr.write(result.stderr)
    return json.loads(output.read_text())
