"""Checkpoints of SViTT runs: written atomically, found, read back with clear messages.

A checkpoint is a dict of plain Python types and tensors, so `torch.load(weights_only=True)` reads
it: model, optimizer, scheduler, step, epoch, rng, config (`SViTTConfig.to_dict()`) and run (the
run's data and hyper-parameters). `train.py` writes one per stage as
`<output-dir>/frames<T>/last.pt`, every `--save-every` steps and at the end; the one
before it stays as `prev.pt`. `train.py --resume`, `eval.py` and `search.py` read them with the
functions below.

    save_checkpoint("checkpoints/frames4/last.pt", {...})
    path = latest_checkpoint("checkpoints")      # the newest */last.pt
    ckpt = load_checkpoint(path)
    load_model_state(model, ckpt["model"], path)
    model, config, run = load_model(path, "cpu", keep_rate_m=1.0)   # evaluation, test-time q_m
"""
import os
from dataclasses import replace
from pathlib import Path

import torch

from config import SViTTConfig


def previous_path(path):
    """Where the checkpoint before `path` is kept: `last.pt` -> `prev.pt`."""
    path = Path(path)
    return path.with_name("prev.pt" if path.name == "last.pt" else f"{path.stem}.prev.pt")


def save_checkpoint(path, checkpoint, keep_previous=True):
    """Atomic: write a temporary file beside `path`, flush it to disk, then rename it over `path`.

    The checkpoint it replaces is kept as `prev.pt` (previous_path), so that one which later turns
    out corrupt has a fallback. A write that fails (disk full, an exception, a signal) removes the
    temporary file and leaves `path` and `prev.pt` as they were."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        if keep_previous and path.exists():
            keep_as(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keep_as(path, previous):
    """`previous` becomes the file at `path`: a hard link, so that `path` never goes missing, or a
    rename where the file system has no links."""
    link = previous.with_suffix(".pt.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, previous)


def latest_checkpoint(folder, pattern="*/last.pt"):
    """The newest `pattern` under `folder` (one folder per stage or fine-tuning task)."""
    candidates = sorted(Path(folder).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        kept = sorted(Path(folder).glob(pattern.replace("last.pt", "prev.pt")))
        offer = f"; the previous one is kept: --resume {kept[-1]}" if kept else ""
        raise SystemExit(f"no checkpoint {pattern} under {folder}/: train one with "
                         f"`python train.py --frames 4`, or name one{offer}")
    return candidates[-1]


def load_checkpoint(path, required=("model", "config", "step", "epoch")):
    """The checkpoint dict at `path` on the CPU; a missing or unreadable file, or one without the
    `required` keys, stops the program with a message that names it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path} does not exist") from None
    except Exception as error:  # unpickling errors: a truncated file, or one holding code
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        previous = previous_path(path)
        offer = (f"; the checkpoint before it is kept: --resume {previous}"
                 if previous.exists() and previous != Path(path) else "")
        raise SystemExit(f"{path} is not a readable SViTT checkpoint ({reason}){offer}") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"{path} lacks {missing}; is it a checkpoint of this project?")
    return ckpt


def load_model_state(model, state, source):
    """load_state_dict with a message that names the keys that differ instead of a traceback."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
              for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the model built from its config:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): "
                         f"{', '.join(missing[:8])}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if shapes:
            lines.append(f"  other shapes ({len(shapes)}): " + "; ".join(shapes[:8]))
        raise SystemExit("\n".join(lines))
    model.load_state_dict(state)


def config_of(ckpt, path):
    """The SViTTConfig a checkpoint was trained with; one that this version cannot build stops the
    program with a message naming the file."""
    try:
        return SViTTConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as error:
        raise SystemExit(f"{path}: {error}") from None


def sparsity_overrides(config, *, keep_rate_v=None, keep_rate_m=None, blocks=None, dense=False):
    """The config with test-time sparsity (Table 1, Figs. 4-5); the weights do not change."""
    if dense:
        return replace(config, block_size=None, keep_rate_v=1.0, keep_rate_m=1.0)
    if keep_rate_v is not None:
        config = replace(config, keep_rate_v=keep_rate_v)
    if keep_rate_m is not None:
        config = replace(config, keep_rate_m=keep_rate_m)
    if blocks is not None:
        config = replace(config, local_blocks=blocks[0], random_blocks=blocks[1],
                         block_size=blocks[2])
    return config


def load_model(path, device, task="retrieval", **overrides):
    """A trained model for evaluation: -> (model in eval mode on `device`, its config, the
    checkpoint's run info). `overrides` are sparsity_overrides' test-time sparsity; `task` "qa"
    builds the QA model, and a checkpoint of the other kind is refused with one line."""
    from model import SViTT
    from qa import SViTTQA
    ckpt = load_checkpoint(path, required=("model", "config"))
    trained_for = ckpt.get("run", {}).get("task", "pretrain")
    if (task == "qa") != (trained_for == "qa"):
        raise SystemExit(f"{path} is a {trained_for} checkpoint: evaluate it with "
                         f"--task {'qa' if trained_for == 'qa' else 'retrieval'}")
    config = sparsity_overrides(config_of(ckpt, path), **overrides)
    model = (SViTTQA if task == "qa" else SViTT)(config, pretrained=False)
    load_model_state(model, ckpt["model"], path)
    return model.to(device).eval(), config, ckpt.get("run", {})
