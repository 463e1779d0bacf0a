"""Tests of checkpoint.py: atomic writes that keep the previous checkpoint, finding the newest one,
and reading one back with messages that name the file or the keys that differ."""
import errno
import os
import re

import pytest
import torch

from checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    previous_path,
    save_checkpoint,
)

CHECKPOINT = {"model": {}, "config": {}, "step": 1, "epoch": 0}  # the keys load_checkpoint needs


def test_checkpoint_written_atomically(tmp_path):
    save_checkpoint(tmp_path / "a" / "last.pt", {"step": 1})
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True) == {"step": 1}
    assert not list((tmp_path / "a").glob("*.tmp"))


def partial_then_full(calls):
    """torch.save that writes part of the file and fails like a full disk on call `calls`."""
    real, count = torch.save, [0]

    def save(obj, file, *args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            file.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, file, *args, **kwargs)
    return save


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "frames4" / "last.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert torch.load(tmp_path / "frames4" / "prev.pt", weights_only=True) == {"step": 1}
    monkeypatch.setattr(torch, "save", partial_then_full(1))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": 3})
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert torch.load(tmp_path / "frames4" / "prev.pt", weights_only=True) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "prev.pt"]


def test_previous_path_and_keep_previous(tmp_path):
    assert previous_path(tmp_path / "last.pt") == tmp_path / "prev.pt"
    assert previous_path(tmp_path / "best.pt") == tmp_path / "best.prev.pt"
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert torch.load(tmp_path / "best.prev.pt", weights_only=True) == {"step": 1}
    other = tmp_path / "other" / "last.pt"
    save_checkpoint(other, {"step": 1}, keep_previous=False)
    save_checkpoint(other, {"step": 2}, keep_previous=False)
    assert sorted(p.name for p in other.parent.iterdir()) == ["last.pt"]
    assert torch.load(other, weights_only=True) == {"step": 2}


def test_latest_checkpoint_picks_the_newest(tmp_path):
    older, newer = tmp_path / "frames8" / "last.pt", tmp_path / "frames4" / "last.pt"
    for path, mtime in ((older, 1_000_000), (newer, 2_000_000)):
        save_checkpoint(path, CHECKPOINT)
        os.utime(path, (mtime, mtime))
    save_checkpoint(tmp_path / "frames16" / "prev.pt", CHECKPOINT)  # not a last.pt: not picked
    assert latest_checkpoint(tmp_path) == newer
    os.utime(older, (3_000_000, 3_000_000))
    assert latest_checkpoint(tmp_path) == older


def test_no_checkpoint_names_the_folder_and_offers_the_previous_one(tmp_path):
    pattern = rf"^no checkpoint \*/last\.pt under {re.escape(str(tmp_path))}/: train one"
    with pytest.raises(SystemExit, match=pattern) as stop:
        latest_checkpoint(tmp_path)
    assert "--resume" not in str(stop.value)
    prev = tmp_path / "frames4" / "prev.pt"
    save_checkpoint(prev, CHECKPOINT)
    with pytest.raises(SystemExit, match=rf"; the previous one is kept: --resume "
                                         rf"{re.escape(str(prev))}$"):
        latest_checkpoint(tmp_path)


def test_load_checkpoint_reads_what_save_checkpoint_wrote(tmp_path):
    path = tmp_path / "frames4" / "last.pt"
    state = {**CHECKPOINT, "model": {"w": torch.arange(3.0)}, "step": 7}
    save_checkpoint(path, state)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and torch.equal(ckpt["model"]["w"], torch.arange(3.0))


def test_missing_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(path))} does not exist$"):
        load_checkpoint(path)


class NotATensor:
    """An object that weights_only=True refuses to unpickle (a pickle that could run code)."""


@pytest.mark.parametrize("content", ["garbage", "truncated", "code"])
def test_file_that_is_not_a_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "frames4" / "last.pt"
    if content == "garbage":
        path.parent.mkdir()
        path.write_bytes(b"not a checkpoint")
    else:
        save_checkpoint(path, {**CHECKPOINT, "model": {"w": torch.zeros(1000)}}
                        if content == "truncated" else {**CHECKPOINT, "run": NotATensor()})
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit) as stop:
        load_checkpoint(path)
    message = str(stop.value)
    assert message.startswith(f"{path} is not a readable SViTT checkpoint (")
    assert "\n" not in message and "--resume" not in message  # no prev.pt to offer
    save_checkpoint(path.with_name("prev.pt"), CHECKPOINT)
    with pytest.raises(SystemExit, match=rf"the checkpoint before it is kept: --resume "
                                         rf"{re.escape(str(path.with_name('prev.pt')))}$"):
        load_checkpoint(path)


def test_checkpoint_without_the_required_keys_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "step": 3}, path)
    with pytest.raises(SystemExit, match=re.escape(f"{path} lacks ['config', 'epoch']; is it a "
                                                   f"checkpoint of this project?")):
        load_checkpoint(path)
    assert load_checkpoint(path, required=("model", "step"))["step"] == 3
    torch.save([1, 2, 3], path)  # not even a dict
    with pytest.raises(SystemExit, match=re.escape("lacks ['model', 'config', 'step', 'epoch']")):
        load_checkpoint(path)


def test_load_model_state_names_the_keys_that_differ():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    del state["1.bias"]
    state["2.weight"] = torch.ones(1)
    state["0.weight"] = torch.ones(4, 2)
    with pytest.raises(SystemExit) as stop:
        load_model_state(model, state, "run/last.pt")
    assert str(stop.value).splitlines() == [
        "run/last.pt does not fit the model built from its config:",
        "  missing from the checkpoint (1): 1.bias",
        "  not in the model (1): 2.weight",
        "  other shapes (1): 0.weight: checkpoint (4, 2) vs model (3, 2)"]
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key])
    extra = {**{k: torch.ones_like(v) for k, v in model.state_dict().items()},
             "head.weight": torch.ones(2)}
    with pytest.raises(SystemExit, match=r"fit the model built from its config:\n"
                                         r"  not in the model \(1\): head\.weight$"):
        load_model_state(model, extra, "run/last.pt")
    fitting = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_model_state(model, fitting, "run/last.pt")
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in model.state_dict().values())
