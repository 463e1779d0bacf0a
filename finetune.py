"""Fine-tuning for the downstream tasks (Sec. 5, Table 9): settings, data and models of
`train.py --task retrieval` and `train.py --task qa`.

    python train.py --task retrieval --init checkpoints/frames8/last.pt   # VTC + VTM, no MLM
    python train.py --task qa --init checkpoints/frames8/last.pt          # the answer decoder
    python eval.py --task qa                                               # the newest QA run

A run starts from a pre-training checkpoint of any stage (`--init`); asking for more frames than
it has expands it as pre-training does (curriculum.expand). Its stage (frames, sparsity, epochs,
batch, learning rate) is Table 9's fine-tuning column for `base`, scaled for the CPU preset `tiny`
as its pre-training stages are. Checkpoints go to `<output-dir>/<task>_frames<T>/last.pt` and
resume with `--resume` like pre-training runs. train.py holds the loop; this file what differs.
"""
from dataclasses import replace
from pathlib import Path

import collate
import curriculum
import downstream_data
import synthetic
from checkpoint import latest_checkpoint, load_checkpoint, load_model_state
from config import SViTTConfig
from curriculum import Stage
from model import SViTT
from qa import ANSWER_LEN, QUESTION_LEN, SViTTQA

PARAGRAPH_TEXT_LEN = 64  # text tokens of paragraph retrieval (Table 9: 64 for DiDeMo)


def _finetune_stages(stages, settings, keep_rate_m=None, text_lr_scale=None):
    """Fine-tuning stages from pre-training ones: the same frames, blocks and q_v (and q_m and the
    text encoder's learning-rate scale unless given), no warm-up, and the task's epochs, batch
    sizes ({frames: batch}) and learning rate."""
    epochs, batch_sizes, lr = settings
    return {frames: replace(stage, epochs=epochs, warmup_epochs=0, batch_size=batch_sizes[frames],
                            lr=lr, text_lr_scale=(stage.text_lr_scale if text_lr_scale is None
                                                  else text_lr_scale),
                            keep_rate_m=stage.keep_rate_m if keep_rate_m is None else keep_rate_m)
            for frames, stage in stages.items()}


# Table 9, fine-tuning columns: no warm-up, weight decay 0.02; retrieval lr 1e-5 with the
# pre-training keep rates; QA at 8 frames, (q_v, q_m) = (0.6, 0.5), lr 5e-5. Table 9 gives QA at 8
# frames only; 4 and 16 take that stage's q_v with QA's q_m.
FINETUNE_STAGES = {
    "retrieval": _finetune_stages(curriculum.STAGES, (15, {4: 64, 8: 48, 16: 32}, 1e-5)),
    "qa": _finetune_stages(curriculum.STAGES, (5, {4: 128, 8: 128, 16: 128}, 5e-5),
                           keep_rate_m=0.5),
}

# The CPU preset: G = 14 as in its pre-training stages; a few epochs of the small synthetic splits
# at a larger learning rate (its video encoder learnt from scratch minutes ago), batches a laptop
# holds; as in Table 9, no warm-up. Retrieval keeps pre-training's text rate (1/20: at the full
# rate the captions of a scene collapse together) and takes 12 epochs at 3e-4: 6 epochs at 1e-4
# with the text at the full rate left t2v R@1 where zero-shot was (seed 0: 6.2 against 7.5), 12
# at 3e-4 with the text at 1/20 raised it to 10.0 (checkpoints pre-trained with crops and without
# LayerScale; not tuned again since). QA trains its new decoder, the text side included, at the
# full rate for 4 epochs at 2.5e-4 (600 steps): from the 200-step 8-frame checkpoint of seed 0, one
# epoch answered 32.8% at 1e-4, 32.5% at 2.5e-4 and 32.1% at 5e-4, two epochs at 2.5e-4 36.1%: the
# answer decoder needs steps more than a larger rate. From the 350-step checkpoints (three seeds)
# two epochs answered 36.4% (34.6-40.6), four 50.0% (45.2-57.6; the README); under bf16 autocast
# four fit the 10-minute budget.
TINY_FINETUNE_STAGES = {
    "retrieval": _finetune_stages(curriculum.TINY_STAGES, (12, {4: 32, 8: 32, 16: 16}, 3e-4)),
    "qa": _finetune_stages(curriculum.TINY_STAGES, (4, {4: 32, 8: 32, 16: 16}, 2.5e-4),
                           keep_rate_m=0.5, text_lr_scale=1.0),
}


# Presets whose QA training batches hold the questions of a clip together (3 a clip in the
# synthetic set), each clip encoded once for all of them (downstream_data.QACollate): on the CPU
# the video encoder is most of a step: a forward and backward pass of 32 questions from 11 clips
# took 0.41 of one from 32 clips (seed-0 checkpoint, one thread, timed in turn: 2.54 s, 6.17 s).
# `base` draws questions one by one, as the authors' code does.
QA_BATCHES_BY_CLIP = ("tiny",)


def finetune_stage(task: str, frames: int, preset: str = "base") -> Stage:
    """The fine-tuning stage of `task` at `frames` (Table 9; `tiny`: its CPU scaling)."""
    table = (TINY_FINETUNE_STAGES if preset == "tiny" else FINETUNE_STAGES)[task]
    assert frames in table, f"no {task} stage for {frames} frames; stages exist for {sorted(table)}"
    return table[frames]


# What each task's loss never reaches: pre-training reaches every parameter; retrieval fine-tuning
# (VTC and VTM) not the MLM head's transform and bias (its decoder is the word embeddings); QA not
# the VTC projections, the temperature and the VTM head, which SViTTQA keeps so that checkpoints
# load. `freeze_unused` sets them requires_grad=False: DistributedDataParallel expects a gradient
# for every trainable parameter and otherwise stops at a fine-tuning run's second step. Frozen,
# they leave its reducer and the optimizer and stay as loaded, as in one process.
# find_unused_parameters=True, the authors' choice, gives the same updates but searches the
# autograd graph for them after every forward; on the CPU the two ran retrieval fine-tuning steps
# equally fast (benchmarks/README.md), so the cost decided nothing: freezing names what each task
# trains, and a parameter a change leaves unused by mistake still stops the run at once.
UNUSED_PARAMETERS = {
    "pretrain": (),
    "retrieval": ("mlm_head.",),  # the tied decoder weight is named embeddings.word_embeddings
    "qa": ("vision_proj.", "text_proj.", "logit_scale", "vtm_head."),
}


def freeze_unused(model, task):
    """Freeze the parameters `task`'s loss never reaches (UNUSED_PARAMETERS); -> their names."""
    frozen = [name for name, p in model.named_parameters()
              if name.startswith(UNUSED_PARAMETERS[task])]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def model_class(task: str):
    return SViTTQA if task == "qa" else SViTT


def load_initial_state(model, state, source):
    """Pre-trained weights into a fine-tuning model. A QA model from a pre-training checkpoint
    gets the decoder from its multimodal layers (qa.py); a retrieval model ignores a QA
    checkpoint's decoder."""
    ours = model.state_dict()
    if isinstance(model, SViTTQA):
        has_decoder = any(key.startswith("answer_decoder.") for key in state)
        state = {**{k: v for k, v in ours.items() if k.startswith("answer_decoder.")}, **state}
        load_model_state(model, state, source)
        if not has_decoder:
            model.init_decoder_from_multimodal()
        return "answer decoder " + ("from the checkpoint" if has_decoder else
                                    "from the multimodal layers")
    load_model_state(model, {k: v for k, v in state.items()
                             if not k.startswith("answer_decoder.")}, source)
    return "VTC and VTM heads from the checkpoint"


def default_data(task: str) -> dict:
    """The embedded synthetic split of a task: {"train", "test", "video_root", "answer_list"}."""
    if task == "qa":
        return synthetic.ensure_synthetic_qa()
    return {**synthetic.ensure_synthetic_retrieval(), "answer_list": None}


def task_dataset(task, annotation, video_root, config, *, train, seed=0, paragraph=False,
                 answer_list=None):
    """The dataset of a fine-tuning task (downstream_data.RetrievalDataset or
    downstream_data.VideoQADataset)."""
    common = {"frames": config.frames, "image_size": config.image_size, "train": train,
              "seed": seed, "mean": config.image_mean, "std": config.image_std,
              "flip": train and config.horizontal_flip, "crop_scale": tuple(config.crop_scale)}
    if task == "qa":
        answers = downstream_data.load_answer_list(answer_list) if answer_list else None
        return downstream_data.VideoQADataset(
            annotation, video_root, answer_list=answers,
            group_by_video=train and config.preset in QA_BATCHES_BY_CLIP, **common)
    return downstream_data.RetrievalDataset(annotation, video_root, paragraph=paragraph, **common)


class RetrievalCollate(collate.VideoTextCollate):
    """Pre-training's batches without the MLM inputs: fine-tuning for retrieval trains VTC and VTM
    only, and SViTT.forward leaves MLM out when a batch has no mlm_labels."""

    def __call__(self, items):
        batch = super().__call__(items)
        del batch["mlm_input_ids"], batch["mlm_labels"]
        return batch


def task_collate(task, tokenizer, config, seed):
    """The DataLoader collate_fn of a task's batches."""
    if task == "qa":
        return downstream_data.QACollate(tokenizer, question_len=QUESTION_LEN,
                                         answer_len=ANSWER_LEN)
    if task == "retrieval":
        return RetrievalCollate(tokenizer, text_len=config.text_len, mlm_probability=0.0,
                                seed=seed)
    return collate.make_collate(tokenizer, text_len=config.text_len,
                             mlm_probability=config.mlm_probability, seed=seed)


def finetune_config(config, stage, *, paragraph=False):
    """The checkpoint's config with the fine-tuning stage's sparsity (and text length)."""
    config = replace(config, frames=stage.frames, block_size=stage.block_size,
                     local_blocks=stage.local_blocks, random_blocks=stage.random_blocks,
                     keep_rate_v=stage.keep_rate_v, keep_rate_m=stage.keep_rate_m)
    if paragraph:
        config = replace(config, text_len=max(config.text_len, PARAGRAPH_TEXT_LEN))
    return config


def expand_if_needed(state, old_frames, frames, source):
    """(state dict at `frames`, log line): curriculum.expand when the run asks for more frames."""
    if frames == old_frames:
        return state, f"{source}: {frames} frames"
    if frames < old_frames:
        raise SystemExit(f"--init: {source} has {old_frames} frames; fine-tuning can expand to "
                         f"more frames, not fewer ({frames})")
    state, message = curriculum.expand(state, old_frames, frames)
    return state, message


def stage_of(frames, preset, task="pretrain"):
    """The pre-training (curriculum.py) or fine-tuning (py) stage of `frames` clips;
    a frame count without one is a one-line error that lists those there are."""
    if task == "pretrain":
        table = curriculum.TINY_STAGES if preset == "tiny" else curriculum.STAGES
    else:
        table = (TINY_FINETUNE_STAGES if preset == "tiny"
                 else FINETUNE_STAGES)[task]
    if frames not in table:
        kind = "" if task == "pretrain" else f"{task} "
        raise SystemExit(f"--frames {frames}: no {kind}stage of {frames} frames for the {preset} "
                         f"preset; stages exist for {', '.join(map(str, sorted(table)))}")
    return table[frames]


def build_finetune(args, log_line):
    """build() of a fine-tuning run: a true resume of one (--resume), or a new one from the
    pre-trained checkpoint --init with the task's stage (py)."""
    cls = model_class(args.task)
    if args.resume is not None:
        path = (latest_checkpoint(args.output_dir, f"{args.task}_frames*/last.pt")
                if args.resume == "latest" else Path(args.resume))
        ckpt = load_checkpoint(path)
        if ckpt["run"].get("task", "pretrain") != args.task:
            raise SystemExit(f"--resume: {path} is a {ckpt['run'].get('task', 'pretrain')} run, "
                             f"not {args.task}")
        config = SViTTConfig.from_dict(ckpt["config"])
        model = cls(config, pretrained=False)
        load_model_state(model, ckpt["model"], path)
        log_line(f"resume {path}: step {ckpt['step']}, epoch {ckpt['epoch']}")
        return model, config, stage_of(config.frames, config.preset, args.task), ckpt, True
    if args.init is None:
        raise SystemExit(f"--task {args.task} needs --init CHECKPOINT (a pre-trained model), "
                         f"or --resume")
    ckpt = load_checkpoint(args.init, required=("model", "config"))
    old = SViTTConfig.from_dict(ckpt["config"])
    frames = args.frames or old.frames
    stage = stage_of(frames, old.preset, args.task)
    config = finetune_config(old, stage, paragraph=args.paragraph)
    state, message = expand_if_needed(ckpt["model"], old.frames, frames, args.init)
    model = cls(config, pretrained=False)
    loaded = load_initial_state(model, state, args.init)
    log_line(f"{args.task} fine-tuning from {message}; {loaded}")
    return model, config, stage, None, False
