"""Fine-tuning for the downstream tasks (Sec. 5): the data and models of
`train.py --task retrieval` and `train.py --task qa`.

    python train.py --task retrieval --init checkpoints/frames8/last.pt   # VTC + VTM, no MLM
    python train.py --task qa --init checkpoints/frames8/last.pt          # the answer decoder
    python eval.py --task qa                                               # the newest QA run

A run starts from a pre-training checkpoint of any stage (`--init`); asking for more frames than
it has expands it as pre-training does (curriculum.expand). Its stage (frames, sparsity, epochs,
batch, learning rate) is Table 9's fine-tuning column (`curriculum.stage(frames, preset, task)`).
Checkpoints go to `<output-dir>/<task>_frames<T>/last.pt` and resume with `--resume` like
pre-training runs. train.py holds the loop; this file what differs.
"""
from dataclasses import replace
from pathlib import Path

import curriculum
import downstream_data
import synthetic
from checkpoint import config_of, latest_checkpoint, load_checkpoint, load_model_state
from downstream_data import PARAGRAPH_TEXT_LEN
from model import SViTT
from qa import SViTTQA

# Presets whose QA training batches hold the questions of a clip together (3 a clip in the
# synthetic set), each clip encoded once for all of them (downstream_data.QACollate): on the CPU
# the video encoder is most of a step: a forward and backward pass of 32 questions from 11 clips
# took 0.41 of one from 32 clips (seed-0 checkpoint, one thread, timed in turn: 2.54 s, 6.17 s).
# `base` draws questions one by one, as the authors' code does.
QA_BATCHES_BY_CLIP = ("tiny",)


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
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(UNUSED_PARAMETERS[task]):
            p.requires_grad_(False)
            frozen.append(name)
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


def finetune_config(config, stage, *, paragraph=False):
    """The checkpoint's config with the fine-tuning stage's frames and sparsity (and, for
    paragraphs, their text length)."""
    config = curriculum.stage_config(config, stage)
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


def build_finetune(args, log_line):
    """build() of a fine-tuning run: a true resume of one (--resume), or a new one from the
    pre-trained checkpoint --init with the task's stage (curriculum.stage)."""
    cls = model_class(args.task)
    if args.resume is not None:
        path = (latest_checkpoint(args.output_dir, f"{args.task}_frames*/last.pt")
                if args.resume == "latest" else Path(args.resume))
        ckpt = load_checkpoint(path)
        if ckpt["run"].get("task", "pretrain") != args.task:
            raise SystemExit(f"--resume: {path} is a {ckpt['run'].get('task', 'pretrain')} run, "
                             f"not {args.task}")
        config = config_of(ckpt, path)
        model = cls(config, pretrained=False)
        load_model_state(model, ckpt["model"], path)
        log_line(f"resume {path}: step {ckpt['step']}, epoch {ckpt['epoch']}")
        return model, config, curriculum.stage(config.frames, config.preset, args.task), ckpt, True
    if args.init is None:
        raise SystemExit(f"--task {args.task} needs --init CHECKPOINT (a pre-trained model), "
                         f"or --resume")
    ckpt = load_checkpoint(args.init, required=("model", "config"))
    old = config_of(ckpt, args.init)
    frames = args.frames or old.frames
    stage = curriculum.stage(frames, old.preset, args.task)
    config = finetune_config(old, stage, paragraph=args.paragraph)
    state, message = expand_if_needed(ckpt["model"], old.frames, frames, args.init)
    model = cls(config, pretrained=False)
    loaded = load_initial_state(model, state, args.init)
    log_line(f"{args.task} fine-tuning from {message}; {loaded}")
    return model, config, stage, None, False
