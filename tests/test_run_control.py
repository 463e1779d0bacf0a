"""Tests of run_control.py: one-line errors for bad flags, random states per process, batches
that resume inside an epoch, the run's log, the stop on a signal, the resume command and the
end-of-stage evaluation that fails in one line."""
import argparse
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_control
from checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------

def flags(tmp_path, **changes):
    """train.py's flags as check_args reads them: the defaults, with `changes`."""
    args = dict(frames=None, resume=None, output_dir=str(tmp_path / "out"), data=None,
                video_root=None, test_data=None, preset=None, beit="", epochs=None,
                max_steps=None, save_every=None, batch_size=None, lr=None, text_lr_scale=None,
                workers=None, task="pretrain", init=None, answer_list=None)
    args.update(changes)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "--batch-size 0: must be a positive whole number"),
    ({"epochs": -1}, "--epochs -1: must be a positive whole number"),
    ({"max_steps": 0}, "--max-steps 0: must be a positive whole number"),
    ({"save_every": -5}, "--save-every -5: must be a positive whole number"),
    ({"workers": -1}, "--workers -1: must be 0 (load in the main process) or more"),
    ({"lr": -1.0}, "--lr -1.0: must be a finite number, 0 or more"),
    ({"lr": float("nan")}, "--lr nan: must be a finite number, 0 or more"),
    ({"text_lr_scale": float("inf")}, "--text-lr-scale inf: must be a finite number, 0 or more"),
    ({"preset": "base"}, "--preset base starts its video encoder from BEiT (Sec. 5.1): give "
                         "--beit FOLDER, a transformers BEiT such as "
                         "microsoft/beit-base-patch16-224-pt22k-ft22k, or --beit none to train it "
                         "from random weights"),
    ({"video_root": "{tmp}/no/such/folder"}, "--video-root {tmp}/no/such/folder: no such folder"),
    ({"data": "{tmp}/missing.json"}, "--data {tmp}/missing.json: no such file"),
    ({"test_data": "{tmp}"}, "--test-data {tmp}: no such file"),  # a folder is not a file
    ({"init": "{tmp}/none.pt"}, "--init {tmp}/none.pt: no such file"),
    ({"answer_list": "{tmp}/answers.json"}, "--answer-list {tmp}/answers.json: no such file"),
    ({"output_dir": "{tmp}/file/out"}, "--output-dir {tmp}/file/out: cannot write checkpoints "
                                       "there (Not a directory)"),
])
def test_bad_flag_stops_with_one_line(tmp_path, changes, message):
    (tmp_path / "file").write_text("")
    changes = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
               for k, v in changes.items()}
    with pytest.raises(SystemExit) as stop:
        run_control.check_args(flags(tmp_path, **changes))
    assert str(stop.value) == message.format(tmp=tmp_path)


def test_good_flags_pass_and_make_the_output_folder(tmp_path):
    (tmp_path / "ann.json").write_text("[]")
    args = flags(tmp_path, batch_size=2, epochs=1, max_steps=1, save_every=1, workers=0, lr=0.0,
                 text_lr_scale=0.05, data=str(tmp_path / "ann.json"), video_root=str(tmp_path),
                 output_dir=str(tmp_path / "a" / "b"))
    run_control.check_args(args)
    assert (tmp_path / "a" / "b").is_dir()
    # --preset base needs no --beit where it does not start from BEiT
    for changes in ({"beit": "none"}, {"resume": "latest"}, {"task": "retrieval"}):
        run_control.check_args(flags(tmp_path, preset="base", **changes))


# --------------------------------------------------------------------------------------------
# Processes and seeds
# --------------------------------------------------------------------------------------------

def test_each_rank_draws_its_own_numbers_and_resumes_its_own_state(tmp_path):
    run_control.seed_everything(0, rank=0)
    rank0 = torch.rand(4)
    run_control.seed_everything(0, rank=1)
    rank1 = torch.rand(4)
    assert not torch.equal(rank0, rank1)
    run_control.seed_everything(0)  # rank 0 draws as a single process
    assert torch.equal(torch.rand(4), rank0)

    class Nothing:  # the optimizer and schedule are not under test here
        def load_state_dict(self, state):
            pass

    states = []
    for rank in range(2):
        run_control.seed_everything(5, rank)
        states.append(run_control.rng_state())
    ckpt = {"rng": states, "step": 7, "epoch": 1, "optimizer": None, "scheduler": None}
    expected = []
    for rank in range(2):
        run_control.set_rng_state(states[rank])
        expected.append(torch.rand(3))
    for rank in range(2):
        run_control.restore_training_state(ckpt, Nothing(), Nothing(), rank=rank, world=2)
        assert torch.equal(torch.rand(3), expected[rank])
    # another number of processes: a line says the streams start anew
    lines = []
    run_control.restore_training_state(ckpt, Nothing(), Nothing(), rank=0, world=4,
                                       log_line=lines.append)
    assert "random states of 2 process(es), this run has 4" in lines[0]


# --------------------------------------------------------------------------------------------
# Batches that resume inside an epoch
# --------------------------------------------------------------------------------------------

def batches_of(sampler, batch_size):
    indices = [index for _, index in sampler]
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def test_grouped_batches_hold_whole_groups():
    groups = [f"scene{i // 4}" for i in range(48)]   # 12 groups of 4, items of a group adjacent
    groups = [groups[i] for i in torch.randperm(48, generator=torch.Generator().manual_seed(0))]
    dataset = list(range(48))
    sampler = run_control.ResumableSampler(dataset, world=1, rank=0, seed=3, batch_size=8,
                                           groups=groups)
    sampler.set_epoch(0)
    batches = batches_of(sampler, 8)
    assert len(batches) == len(sampler) // 8 == 6
    for batch in batches:
        labels = [groups[i] for i in batch]
        assert all(labels.count(g) == 4 for g in labels), labels
    assert sorted(i for b in batches for i in b) == list(range(48))
    sampler.set_epoch(1)
    assert batches_of(sampler, 8) != batches   # a new order every epoch
    # DDP: two ranks of 4 take the two halves of every global batch of 8; each half whole groups
    shards = []
    for rank in range(2):
        shard = run_control.ResumableSampler(dataset, world=2, rank=rank, seed=3, batch_size=4,
                                             groups=groups)
        shard.set_epoch(0)
        shards.append(batches_of(shard, 4))
        for batch in shards[-1]:
            assert len({groups[i] for i in batch}) == 1
    assert [a + b for a, b in zip(*shards)] == batches
    # resumed two batches into the epoch: the batches an unbroken run had not yet seen
    sampler.set_epoch(0, skip_batches=2)
    assert batches_of(sampler, 8) == batches[2:]


def test_ungrouped_data_keeps_the_distributed_order():
    dataset = list(range(20))
    sampler = run_control.ResumableSampler(dataset, world=1, rank=0, seed=0, batch_size=4)
    reference = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True,
                                                    seed=0,
                                                    drop_last=True)
    sampler.set_epoch(2)
    reference.set_epoch(2)
    assert [i for _, i in sampler] == list(reference)


def test_ungrouped_sampler_resumes_after_the_batches_seen():
    dataset = list(range(22))
    sampler = run_control.ResumableSampler(dataset, world=2, rank=1, seed=4, batch_size=3)
    sampler.set_epoch(5)
    whole = list(sampler)
    assert len(whole) == len(sampler) == 11 and all(epoch == 5 for epoch, _ in whole)
    sampler.set_epoch(5, skip_batches=2)
    assert list(sampler) == whole[6:] and len(sampler) == 5


def test_grouped_order_keeps_groups_together_and_depends_on_the_epoch():
    groups = ["a", "b", "a", "c", "b", "a", "c"]
    order = run_control.grouped_order(groups, seed=1, epoch=0)
    assert sorted(order) == list(range(7))
    labels = [groups[i] for i in order]
    assert len([g for i, g in enumerate(labels) if i == 0 or g != labels[i - 1]]) == 3  # 3 runs
    assert order == run_control.grouped_order(groups, seed=1, epoch=0)
    assert any(run_control.grouped_order(groups, seed=1, epoch=e) != order for e in range(1, 6))


# --------------------------------------------------------------------------------------------
# Log, stop, resume
# --------------------------------------------------------------------------------------------

def test_run_log_writes_from_the_main_process_only(caplog):
    caplog.set_level(logging.INFO, logger="train")
    run_control.RunLog(main_process=False).line("from rank 1")
    main = run_control.RunLog(main_process=True)
    main.line("from rank 0")
    assert [r.getMessage() for r in caplog.records] == ["from rank 0"]
    caplog.clear()
    main.step_times = [2.0, 0.5, 0.9, 0.6]
    main.losses = [4.0, 3.0, 2.0, 1.0]
    main.skipped, main.skipped_files = 3, {"b.mp4", "a.mp4"}
    main.close(frames=4, step=4, epoch=1, epochs=2, steps_per_epoch=2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("step time: first 2.000 s, median of the 3 after it 0.600 s, "
                               "peak memory ")
    assert lines[1] == "skipped 3 unreadable clips (2 files): a.mp4, b.mp4"
    assert lines[2] == ("stage T=4 stopped at step 4 (epoch 1/2); mean loss of the last 2 steps "
                        "1.500")


def test_peak_memory_is_the_process_peak_in_gib():
    text = run_control.peak_memory()
    assert text.endswith(" GiB (process RSS)")
    gib = float(text.split()[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    assert 0.05 < gib <= peak + 0.01   # a process with torch loaded holds well over 50 MB
    assert run_control.peak_memory("cpu").endswith(" GiB (process RSS)")  # CUDA's only on CUDA


def test_stop_request_waits_for_the_step_then_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with run_control.StopRequest("c/frames4/last.pt") as stop:
        assert not stop.agreed(1, "cpu") and stop.name is None
        os.kill(os.getpid(), signal.SIGTERM)  # the first: noted, the step goes on
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        assert stop.agreed(1, "cpu")
        with pytest.raises(SystemExit, match=r"^SIGINT again: stopped at once; the last "
                                             r"checkpoint written is c/frames4/last\.pt$"):
            os.kill(os.getpid(), signal.SIGINT)
            signal.getsignal(signal.SIGINT)  # the handler runs by this line at the latest
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back


def test_resume_command_replaces_resume():
    argv = ["--resume", "old.pt", "--data", "a.json", "--resume=x.pt", "--max-steps", "9"]
    assert run_control.resume_command(argv, "c/frames4/last.pt") == (
        "python train.py --resume c/frames4/last.pt --data a.json --max-steps 9")
    assert run_control.resume_command(["--resume", "--frames", "8"], "l.pt") == (
        "python train.py --resume l.pt --frames 8")


def test_resume_command_quotes_for_the_shell():
    assert run_control.resume_command(["--data", "my clips.json"], "a b/last.pt") == (
        "python train.py --resume 'a b/last.pt' --data 'my clips.json'")


# --------------------------------------------------------------------------------------------
# Processes: a run's loader at exit, the end-of-stage evaluation
# --------------------------------------------------------------------------------------------

LOADER_AT_EXIT = """
import sys, torch
sys.path.insert(0, {root!r})
from run_control import close_loader, ignore_stop_signals
loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1,
                                     persistent_workers=True, worker_init_fn=ignore_stop_signals)
next(iter(loader))
if sys.argv[1] == "close":
    close_loader(loader)
print("done", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("close", [True, False])
def test_a_run_exits_with_its_loader_alive(tmp_path, close):
    """Persistent workers ignore SIGTERM; a loader still alive at exit (here a global) made the
    process wait for them forever unless close_loader stopped them first."""
    script = tmp_path / "loader_at_exit.py"
    script.write_text(LOADER_AT_EXIT.format(root=str(ROOT)))
    process = subprocess.Popen([sys.executable, str(script), "close" if close else "keep"],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        process.wait(timeout=60 if close else 8)
        exited = True
    except subprocess.TimeoutExpired:
        exited = False
        os.killpg(process.pid, 9)
        process.wait()
    assert "done" in process.stdout.read()
    assert exited == close


@pytest.mark.slow
def test_failed_evaluation_is_one_line_and_keeps_the_checkpoint(tmp_path):
    path = tmp_path / "frames4" / "last.pt"
    save_checkpoint(path, {"step": 1})  # not what eval.py can read
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps([{"video": "x.mp4"}]))
    with pytest.raises(SystemExit) as stop:
        run_control.evaluate_stage(path, bad, tmp_path, "cpu")
    message = str(stop.value)
    assert message.startswith("the end-of-stage evaluation failed (")
    assert "\n" not in message and "Traceback" not in message
    assert f"the checkpoint {path} is kept" in message
    assert path.exists()
