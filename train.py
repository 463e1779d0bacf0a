"""Pre-training SViTT with temporal sparse expansion (Sec. 4.2, A.3).

    python train.py --frames 4                 # stage 1: 4 frames, (q_v, q_m) = (0.7, 0.1)
    python train.py --resume --frames 8        # stage 2: expand the 4-frame model to 8 frames
    python train.py --resume                   # continue the newest checkpoint where it stopped
    python train.py --task retrieval --init checkpoints/frames8/last.pt   # fine-tuning (Sec. 5)
    python train.py --task qa --init checkpoints/frames8/last.pt          # video QA (finetune.py)

Without --data the embedded synthetic data set is generated (once) and used with the CPU preset
`tiny`; with `--data ANNOTATION --video-root DIR --preset base` the same script trains the paper's
model on a GPU, and `torchrun --nproc_per_node=N train.py ...` trains on N GPUs (DDP).

A stage is picked by --frames from the table of `curriculum.py` (Tables 7 and 9). Resuming a
checkpoint of the same frame count continues it exactly (model, optimizer, schedule, step, random
states); resuming one of fewer frames expands it (Eq. 22-23, 26-27) into the new stage, with the
stage's sparsity and hyper-parameters and a fresh optimizer and schedule.

Checkpoints (`checkpoint.py`) are dicts of model, optimizer, scheduler, step, epoch, rng, config
and run (plain Python types, so `torch.load(weights_only=True)` reads them), written atomically as
`<output-dir>/frames<T>/last.pt` every --save-every steps and at the end of the stage, the one
before kept as `prev.pt`. SIGTERM or Ctrl-C ends the current step, writes the checkpoint and stops
with the command that resumes; a second signal stops at once. TensorBoard logs sit beside the
checkpoints (`tensorboard --logdir checkpoints`); --profile adds a trace for TensorBoard's
profiler plugin. What keeps a long run going (flag checks, random states, the sampler that resumes
inside an epoch, the log, the stop on a signal) is in `run_control.py`; the setup of a fine-tuning
run in `finetune.py`.
"""
import argparse
import contextlib
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import curriculum
import data
import downstream_data
import finetune
from checkpoint import (
    config_of,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
)
from config import preset
from cpu_speedups import keep_freed_memory, use_bf16
from model import SViTT
from pretrained import text_model_path
from run_control import (
    ResumableSampler,
    RunLog,
    StageCheckpoint,
    StopRequest,
    check_args,
    close_loader,
    evaluate_stage,
    ignore_stop_signals,
    restore_training_state,
    resume_command,
    seed_everything,
    setup_distributed,
)
from synthetic import ensure_synthetic

log = logging.getLogger("train")
# Default steps between checkpoints: two to three minutes of the tiny quickstart on a 2-core CPU,
# a few minutes of `base` on GPUs. A tiny checkpoint (weights and AdamW's moments, 325 MB) takes
# about a second to write and flush: every 25 steps and after every epoch would cost the 8-frame
# stage 14 of them, 4 this way
SAVE_EVERY = {"tiny": 100, "base": 500}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=None,
                   help="frames per clip T; picks the stage (4, 8 or 16). "
                        "Default: 4, or the resumed checkpoint's")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="checkpoint to continue (same frames) or expand (more frames); "
                        "without PATH the newest last.pt under --output-dir")
    p.add_argument("--output-dir", default="checkpoints",
                   help="checkpoints and logs, one folder per stage")
    p.add_argument("--data", default=None,
                   help="training annotation JSON (default: the synthetic data set)")
    p.add_argument("--video-root", default=None,
                   help="folder the annotation's video paths are relative to")
    p.add_argument("--test-data", default=None,
                   help="annotation of the test split for the end-of-stage retrieval")
    p.add_argument("--preset", default=None, choices=["tiny", "base"],
                   help="model preset for a new run (default tiny); a resumed run takes the "
                        "checkpoint's")
    p.add_argument("--beit", default="",
                   help="transformers BEiT folder or hub id to initialise the video encoder (new "
                        "runs; --preset base needs it, or 'none' to start it from random weights)")
    p.add_argument("--text-model", default=None,
                   help="BERT name or folder for the text encoder (new runs)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the stage (default: the stage table's)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps of the stage (smoke runs); the "
                        "schedule still spans --epochs")
    p.add_argument("--save-every", type=int, default=None, metavar="STEPS",
                   help="write the checkpoint every STEPS steps as well as at the end "
                        f"(default: {SAVE_EVERY['tiny']} for the tiny preset, two to three "
                        f"minutes on a CPU; {SAVE_EVERY['base']} for base)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="clips per step over all processes (default: stage's)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the stage's)")
    p.add_argument("--text-lr-scale", type=float, default=None,
                   help="learning rate of the pretrained text encoder relative to --lr "
                        "(default: the stage's)")
    p.add_argument("--dense", action="store_true",
                   help="train the stage without sparsity (full attention, every token kept): "
                        "the baseline that hybrid sparsity is compared with")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per process (default: 4 on a GPU, 1 on a "
                        "CPU, where the model needs the cores)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order and sampling")
    p.add_argument("--profile", action="store_true",
                   help="record a few steps with torch.profiler into <stage>/profile "
                        "(TensorBoard plugin)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16: the forward under bfloat16 autocast (fp32 weights, optimizer and "
                        "losses); auto: bf16 on GPUs and on CPUs with bf16 instructions "
                        "(AVX512-BF16, AMX), fp32 elsewhere")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the zero-shot retrieval at the end of the stage")
    p.add_argument("--task", default="pretrain", choices=["pretrain", "retrieval", "qa"],
                   help="pre-training, or fine-tuning for retrieval (VTC + VTM) or video QA")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="pre-trained checkpoint a fine-tuning run starts from")
    p.add_argument("--answer-list", default=None,
                   help="QA: JSON list of the answers evaluation chooses from")
    p.add_argument("--paragraph", action="store_true",
                   help="retrieval: join a video's caption list into one text (DiDeMo)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# The run: config, model, data, optimizer
# --------------------------------------------------------------------------------------------

def build(args, log_line):
    """-> (model, config, stage, checkpoint or None, resume_exact). Architecture comes from the
    checkpoint when resuming; a new run from --preset."""
    if args.task != "pretrain":
        return finetune.build_finetune(args, log_line)
    if args.resume is None:
        frames = args.frames or 4
        stage = curriculum.stage(frames, args.preset or "tiny")
        overrides = {"beit_checkpoint": "" if args.beit == "none" else args.beit}
        if args.text_model:
            overrides["text_model"] = args.text_model
        config = curriculum.stage_config(preset(args.preset or "tiny", **overrides), stage,
                                         args.dense)
        return SViTT(config), config, stage, None, False

    path = (latest_checkpoint(args.output_dir, "frames*/last.pt") if args.resume == "latest"
            else Path(args.resume))
    ckpt = load_checkpoint(path)
    old = config_of(ckpt, path)
    if args.preset and args.preset != old.preset:
        raise SystemExit(f"--resume: {path} holds a '{old.preset}' model; --preset {args.preset} "
                         f"asks for another architecture (leave --preset out: a resumed run takes "
                         f"the checkpoint's)")
    frames = args.frames or old.frames
    if frames == old.frames:  # a true resume
        model = SViTT(old, pretrained=False)
        load_model_state(model, ckpt["model"], path)
        log_line(f"resume {path}: step {ckpt['step']}, epoch {ckpt['epoch']}, {old.frames} frames")
        return model, old, curriculum.stage(frames, old.preset), ckpt, True
    if frames < old.frames:
        raise SystemExit(f"--resume: {path} has {old.frames} frames; expansion goes to more "
                         f"frames, not {frames}")
    # temporal sparse expansion: the new stage's sparsity, the weights resized along time
    stage = curriculum.stage(frames, old.preset)
    curriculum.check_curriculum([old, stage])  # Eq. 14-16
    config = curriculum.stage_config(old, stage, args.dense)
    state, message = curriculum.expand(ckpt["model"], old.frames, frames)
    model = SViTT(config, pretrained=False)
    load_model_state(model, state, path)
    edges = curriculum.count_config_edges(config)
    log_line(f"temporal sparse expansion: {path} ({old.frames} frames, q_v={old.keep_rate_v}) -> "
             f"{frames} frames, (K_l, K_r, G)=({config.local_blocks}, {config.random_blocks}, "
             f"{config.block_size}), (q_v, q_m)=({config.keep_rate_v}, {config.keep_rate_m}), "
             f"sparsity {edges.sparsity:.2f}; fresh optimizer and schedule")
    log_line(message)
    return model, config, stage, None, False


def hyper_parameters(args, stage, ckpt):
    """{epochs, batch_size, lr, text_lr_scale}: the stage's unless given; a true resume (ckpt)
    keeps its run's."""
    if ckpt is not None:
        return {"text_lr_scale": 1.0,  # checkpoints from before the field trained so
                **{key: ckpt["run"][key] for key in ("epochs", "batch_size", "lr", "text_lr_scale")
                   if key in ckpt["run"]}}
    return {"epochs": stage.epochs if args.epochs is None else args.epochs,
            "batch_size": stage.batch_size if args.batch_size is None else args.batch_size,
            "lr": stage.lr if args.lr is None else args.lr,
            "text_lr_scale": (stage.text_lr_scale if args.text_lr_scale is None
                              else args.text_lr_scale)}


def data_paths(args):
    """(train annotation, test annotation or None, video root)."""
    if args.data is None and args.task != "pretrain":
        paths = finetune.default_data(args.task)
        args.answer_list = args.answer_list or paths["answer_list"]
        return paths["train"], paths["test"], paths["video_root"]
    if args.data is None:
        paths = ensure_synthetic()
        return paths["train"], paths["test"], paths["video_root"]
    if args.video_root is None:
        raise SystemExit("--data needs --video-root, the folder its video paths are relative to")
    return args.data, args.test_data, args.video_root


def make_loader(dataset, config, *, per_rank, world, rank, seed, workers, device,
                task="pretrain"):
    """-> (DataLoader of per-rank batches, its ResumableSampler, steps per epoch)."""
    sampler = ResumableSampler(dataset, world=world, rank=rank, seed=seed, batch_size=per_rank,
                               groups=dataset.groups)
    steps_per_epoch = sampler.num_samples // per_rank
    if steps_per_epoch == 0:
        raise SystemExit(f"{dataset.annotation_name}: {len(dataset)} pairs make no batch of "
                         f"{per_rank} per process")
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=workers,
                        drop_last=True,
                        collate_fn=downstream_data.task_collate(task, tokenizer, config, seed),
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler, steps_per_epoch


def is_pretrained_text(name):
    """Whether a parameter belongs to the pretrained text encoder f_t: BERT's embeddings, the
    text layers and the MLM head (tied to the word embeddings). The multimodal layers f_m start
    from BERT's last layers too, but their task, fusing words with video tokens, is new: slowed
    down with f_t, the tiny preset's f_m learned MLM from the video far later (MLM loss 1.5
    against 0.8 after 200 steps) and its VTM not at all."""
    return name.startswith(("embeddings.", "text_layers.", "mlm_head."))


def make_optimizer(model, lr, weight_decay, text_lr_scale=1.0):
    """AdamW (0.9, 0.999); no weight decay on biases, norms, embeddings and the temperature.

    The pretrained text side trains at lr * text_lr_scale: 1 in the paper, where both encoders
    start pretrained; the tiny preset's video encoder starts from scratch at a learning rate that
    would wash out its pretrained MiniLM text encoder (the captions' features then collapse into
    a narrow cone), so its text side learns 20 times slower."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "relative_position",
                                                     "cls_bias"))
        scale = text_lr_scale if is_pretrained_text(name) else 1.0
        groups.setdefault((flat, scale), []).append(p)
    # the fused kernel updates every tensor in one pass: on a 2-core CPU 15 ms a step for the
    # tiny model against 90 ms for the per-tensor loop (5% of an 8-frame bf16 step), the same
    # arithmetic
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for params in groups.values() for p in params)
    return torch.optim.AdamW([{"params": params, "weight_decay": 0.0 if flat else weight_decay,
                               "lr": lr * scale}
                              for (flat, scale), params in sorted(groups.items())],
                             lr=lr, betas=(0.9, 0.999), fused=fused or None)


def cosine_schedule(optimizer, warmup_steps, total_steps, floor=0.0):
    """Linear warm-up to the peak learning rate, then a cosine down to `floor` x the peak (the
    config's lr_floor) and no lower."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(floor, 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train_step(model, optimizer, scheduler, batch, device, step, bf16=False):
    """Step `step` of Sec. A.3: the three losses with equal weights (the forward under bf16
    autocast with `bf16`), their gradient, AdamW and the schedule. -> (the losses as floats, the
    forward's record)."""
    tensors = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(tensors)
    names = [name for name in out if name.startswith("loss")]  # the task's losses
    losses = torch.stack([out[name].detach().float() for name in names])
    values = dict(zip(names, losses.tolist()))  # one synchronisation for them all
    if not math.isfinite(values["loss"]):
        parts = ", ".join(f"{name[5:]} {value:.3g}" for name, value in values.items()
                          if name != "loss")
        raise SystemExit(f"step {step}: loss is {values['loss']} ({parts}); "
                         f"batch videos: {', '.join(batch['paths'])}")
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    scheduler.step()
    return values, out["record"]


@contextlib.contextmanager
def closing_loader(loader):
    """The loader's workers stop when the block ends, however it ends (`close_loader`)."""
    try:
        yield loader
    finally:
        close_loader(loader)


def make_dataset(args, config, annotation, video_root):
    """The training set of the task: caption pairs for pre-training (data.py), a fine-tuning
    task's (finetune.task_dataset)."""
    if args.task != "pretrain":
        return finetune.task_dataset(args.task, annotation, video_root, config, train=True,
                                     seed=args.seed, paragraph=args.paragraph)
    return data.VideoTextDataset(annotation, video_root, frames=config.frames,
                                 image_size=config.image_size, train=True, mean=config.image_mean,
                                 std=config.image_std, flip=config.horizontal_flip,
                                 crop_scale=tuple(config.crop_scale), seed=args.seed)


def check_batch_size(batch_size, world, task):
    if batch_size % world:
        raise SystemExit(f"--batch-size {batch_size}: must divide among the {world} processes")
    if task != "qa" and batch_size // world < 2:
        raise SystemExit(f"--batch-size {batch_size}: VTC and VTM draw their negatives from the "
                         f"batch, so each of the {world} process(es) needs at least 2 clips")


def distributed(model, world, device):
    """The model as the step runs it: DistributedDataParallel under torchrun, else itself."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)


def stage_line(config, edges):
    return (f"stage T={config.frames} ({config.preset}): (K_l, K_r, G)=({config.local_blocks}, "
            f"{config.random_blocks}, {config.block_size}), (q_v, q_m)=({config.keep_rate_v}, "
            f"{config.keep_rate_m}), {edges.total / 1e6:.3f}M edges of {edges.dense / 1e6:.3f}M "
            f"dense, sparsity S={edges.sparsity:.2f} (Eq. 19)")


def train(args, argv=()):
    """One stage: AdamW with a cosine schedule and warm-up over the stage's epochs (Sec. A.3,
    Table 9). A checkpoint every --save-every steps and at the end; SIGTERM or SIGINT stop the
    run after its step with a checkpoint (StopRequest). `argv`, the command line, goes into the
    message that says how to resume."""
    # setup: processes, model, data, optimizer, where a resumed run stands
    keep_freed_memory()
    rank, world, device = setup_distributed(args.device)
    run_log = RunLog(main_process=rank == 0)
    seed_everything(args.seed, rank)  # each process its own dropout and random blocks (Eq. 8)
    model, config, stage, ckpt, exact = build(args, run_log.line)
    finetune.freeze_unused(model, args.task)  # DDP waits for a gradient of every trainable one
    edges = curriculum.count_config_edges(config)  # Eq. 17-19, logged with every step
    run_log.line(stage_line(config, edges))
    train_ann, test_ann, video_root = data_paths(args)
    dataset = make_dataset(args, config, train_ann, video_root)
    hp = hyper_parameters(args, stage, ckpt if exact else None)
    epochs, batch_size = hp["epochs"], hp["batch_size"]
    check_batch_size(batch_size, world, args.task)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 1)
    loader, sampler, steps_per_epoch = make_loader(
        dataset, config, per_rank=batch_size // world, world=world, rank=rank, seed=args.seed,
        workers=workers, device=device, task=args.task)
    ddp = distributed(model.to(device), world, device)
    optimizer = make_optimizer(model, hp["lr"], stage.weight_decay, hp["text_lr_scale"])
    total_steps = epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, int(stage.warmup_epochs * steps_per_epoch), total_steps,
                                config.lr_floor)
    step, epoch = ((0, 0) if not exact else
                   restore_training_state(ckpt, optimizer, scheduler, rank=rank, world=world,
                                          seed=args.seed, log_line=run_log.line))
    max_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    bf16 = use_bf16(args.precision, device)
    run = {**hp, "seed": args.seed, "data": str(train_ann), "video_root": str(video_root),
           "test_data": str(test_ann) if test_ann else None, "task": args.task,
           "init": args.init, "paragraph": args.paragraph,
           "answer_list": str(args.answer_list) if args.answer_list else None,
           "precision": "bf16" if bf16 else "fp32"}
    prefix = "" if args.task == "pretrain" else f"{args.task}_"
    stage_dir = Path(args.output_dir) / f"{prefix}frames{config.frames}"
    checkpoint = StageCheckpoint(stage_dir / "last.pt", model=model, optimizer=optimizer,
                                 scheduler=scheduler, config=config, run=run, rank=rank,
                                 world=world)
    save_every = args.save_every or SAVE_EVERY.get(config.preset, SAVE_EVERY["base"])
    run_log.open(stage_dir, profile=args.profile)
    items, item = ("questions", "questions") if args.task == "qa" else ("pairs", "clips")
    run_log.line(f"{len(dataset)} {items}, {steps_per_epoch} steps of {batch_size} {item} an "
                 f"epoch, {epochs} epochs, lr {hp['lr']:g}, {world} process(es) on {device}, "
                 f"{'bf16 autocast' if bf16 else 'fp32'}; logs in {stage_dir}")

    # the loop: a resumed epoch skips the batches it has seen; every process stops after the
    # same step, and saves at the same steps
    model.train()
    stopped = False
    with StopRequest(checkpoint.path) as stop, closing_loader(loader):
        while epoch < epochs and step < max_steps and not stopped:
            sampler.set_epoch(epoch, skip_batches=step - epoch * steps_per_epoch)
            for batch in run_log.progress(loader, total=min(len(loader), max_steps - step),
                                          desc=f"T={config.frames} epoch {epoch + 1}/{epochs}"):
                values, record = train_step(ddp, optimizer, scheduler, batch, device, step, bf16)
                step += 1
                epoch += step == (epoch + 1) * steps_per_epoch  # a resume starts the next one
                run_log.step(step, values, batch=batch, clips=batch_size,
                             lr=scheduler.get_last_lr()[0], edges=edges, record=record)
                stopped = stop.agreed(world, device)
                if stopped or step >= max_steps or step % save_every == 0:
                    checkpoint.save(step, epoch, "stopping" if stopped else "periodic")
                if stopped or step >= max_steps:
                    break
            run_log.bar.close()

    run_log.close(frames=config.frames, step=step, epoch=epoch, epochs=epochs,
                  steps_per_epoch=steps_per_epoch, device=device)
    if world > 1:
        dist.destroy_process_group()
    if stopped:
        run_log.line(f"{stop.name}: stopped after step {step} of {max_steps} with the checkpoint "
                     f"{checkpoint.path}; continue with: "
                     f"{resume_command(argv, checkpoint.path)}")
    return {"checkpoint": checkpoint.path, "losses": run_log.losses, "step": step,
            "stopped": stop.signum, "test_data": test_ann, "video_root": video_root,
            "task": args.task, "answer_list": args.answer_list, "paragraph": args.paragraph,
            "precision": run["precision"]}


def main(argv=None):
    """Train one stage, then evaluate it when there is a test split; -> the run's result.

    User errors (flags, files, annotations) stop with one line and a non-zero exit; a run stopped
    by SIGTERM or SIGINT exits with 128 + the signal's number after writing its checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        check_args(args)
        result = train(args, argv)
    except (data.AnnotationError, curriculum.NoStage) as error:
        raise SystemExit(str(error)) from None
    if result["stopped"]:
        raise SystemExit(128 + result["stopped"])
    if int(os.environ.get("RANK", "0")) != 0 or args.no_eval or not result["checkpoint"].exists():
        return result
    if not result["test_data"]:
        log.info(f"no test split (--test-data): the end-of-stage evaluation is skipped; evaluate "
                 f"with python eval.py --checkpoint {result['checkpoint']} --data TEST.json "
                 f"--video-root DIR")
        return result
    task_args = {"pretrain": [], "retrieval": ["--paragraph"] if args.paragraph else [],
                 "qa": ["--task", "qa", "--k", "128"]
                 + (["--answer-list", str(result["answer_list"])]
                    if result["answer_list"] else [])}[args.task]
    # the quick check computes as the stage trained: under bf16 autocast where it did
    task_args += ["--precision", result["precision"]]
    result["evaluation"] = evaluate_stage(result["checkpoint"], result["test_data"],
                                          result["video_root"], args.device, task_args)
    return result


if __name__ == "__main__":
    main()
