"""Checkpoints of SViTT runs: written atomically, found, read back with clear messages.

A checkpoint is a dict of plain Python types and tensors, so `torch.load(weights_only=True)` reads
it: model, optimizer, scheduler, step, epoch, rng, config (`SViTTConfig.to_dict()`) and run (the
run's data and hyper-parameters). `train.py` writes one per stage as
`<output-dir>/frames<T>/last.pt`; `train.py --resume` and `eval.py` read them with the functions
below.

    save_checkpoint("checkpoints/frames4/last.pt", {...})
    path = latest_checkpoint("checkpoints")      # the newest */last.pt
    ckpt = load_checkpoint(path)
    load_model_state(model, ckpt["model"], path)
"""
import os
from pathlib import Path

import torch


def save_checkpoint(path, checkpoint):
    """Atomic: write a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def latest_checkpoint(folder, pattern="*/last.pt"):
    """The newest `pattern` under `folder` (one folder per stage or fine-tuning task)."""
    candidates = sorted(Path(folder).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"no checkpoint {pattern} under {folder}/: train one with "
                         f"`python train.py --frames 4`, or name one")
    return candidates[-1]


def load_checkpoint(path, required=("model", "config", "step", "epoch")):
    """The checkpoint dict at `path` on the CPU; a missing or unreadable file, or one without the
    `required` keys, stops the program with a message that names it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path} does not exist") from None
    except Exception as error:  # unpickling errors: a truncated file, or one holding code
        raise SystemExit(f"{path} is not a readable SViTT checkpoint "
                         f"({type(error).__name__}: {error})") from None
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
