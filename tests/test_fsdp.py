"""FSDP2 and sharded checkpoints on CPU (gloo, 2 processes under torchrun): the sharded run follows
the 1-process run for every structure, with and without SGT; sharded checkpoints resume at another
world size (2 -> 1, 1 -> 2) on the uninterrupted trajectory; a save killed mid-way leaves the
previous checkpoint the one that loads; leaving the guided phase frees the guides' shards."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_cfg, train_rows

from structlm.config import LinearSpec, from_dict, to_dict
from structlm.runs import checkpoint
from structlm.training import train

WORKER = Path(__file__).with_name("fsdp_worker.py")
KINDS = {"dense": LinearSpec(), "lowrank": LinearSpec("lowrank", rank=16),
         "blockshuffle": LinearSpec("blockshuffle", nblocks=2),
         "blockdense": LinearSpec("blockdense", rank=16, nblocks=2),
         "lowrank+mup": LinearSpec("lowrank", rank=16)}  # --optim.param_scaling mup
CASES = [(k, sgt) for k in KINDS for sgt in (False, True)]


def cfg_for(corpus, out, kind, sgt, **train_kw):
    cfg = tiny_cfg(corpus, out, max_steps=6, eval_interval=3, micro_batch_size=4, **train_kw)
    cfg.model.ffn = KINDS[kind]
    if sgt and kind != "dense":  # guided for the first 3 of 6 steps: the guides leave mid-run
        cfg.train.sgt.mode, cfg.train.sgt.ratio = "fixedstep", 0.5
    if kind.endswith("+mup"):  # per-factor lr groups, the guides' included, across shards
        cfg.optim.param_scaling, cfg.optim.base_width = "mup", 32
    return from_dict(type(cfg), to_dict(cfg))  # validated again: mup derives the model's scales


def torchrun(job: dict, tmp: Path, name: str) -> None:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(job))
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(path)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def same_losses(a: Path, b: Path, split: str = "train") -> None:
    ra, rb = train_rows(a, split), train_rows(b, split)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=2e-5), (a.name, x, y)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """1-process references; then one torchrun (2 ranks) with the FSDP2 twin of each, a sharded
    run to cut at step 3, and the guide-memory check."""
    tmp = tmp_path_factory.mktemp("fsdp")
    for kind, sgt in CASES:
        train(cfg_for(corpus, tmp / f"one-{kind}-{sgt}", kind, sgt), progress=False)
    twins = [cfg_for(corpus, tmp / f"fsdp-{kind}-{sgt}", kind, sgt, parallel="fsdp")
             for kind, sgt in CASES]
    cut = cfg_for(corpus, tmp / "cut-2", "lowrank", True, parallel="fsdp", ckpt_interval=3,
                  keep_last=5)
    torchrun({"runs": [to_dict(c) for c in [*twins, cut]],
              "guide_memory": str(tmp / "guides.json")}, tmp, "job")
    return tmp


@pytest.mark.parametrize(("kind", "sgt"), CASES)
def test_fsdp_two_processes_follow_one(runs, kind, sgt):
    same_losses(runs / f"one-{kind}-{sgt}", runs / f"fsdp-{kind}-{sgt}")
    same_losses(runs / f"one-{kind}-{sgt}", runs / f"fsdp-{kind}-{sgt}", "val")


def cut_at(run: Path, step: int) -> None:
    """Make `run` look killed after its checkpoint of `step`: later checkpoints and the summary
    gone (the resume trims metrics.jsonl itself)."""
    for ck in (run / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    (run / "checkpoints" / "latest").unlink()
    (run / "summary.json").unlink()


def test_sharded_checkpoints_resume_at_another_world_size(runs, corpus):
    """Saved by 2 ranks at step 3, resumed by 1; saved by 1 (sharded), resumed by 2: both end on
    the uninterrupted run's losses, the SGT phase (guides leave after step 3) included."""
    ref = runs / "one-lowrank-True"
    two = runs / "cut-2"
    assert checkpoint.is_sharded(checkpoint.find_latest(two))
    cut_at(two, 3)
    train(cfg_for(corpus, two, "lowrank", True, parallel="fsdp", ckpt_interval=3, keep_last=5),
          progress=False)  # 2 -> 1
    same_losses(ref, two)
    one = runs / "cut-1"
    cfg = cfg_for(corpus, one, "lowrank", True, parallel="fsdp", ckpt_interval=3, keep_last=5)
    train(cfg, progress=False)
    cut_at(one, 3)
    torchrun({"runs": [to_dict(cfg)]}, runs, "resume")  # 1 -> 2
    same_losses(ref, one)
    from structlm.runs.evaluate import evaluate_run
    assert math.isfinite(evaluate_run(str(one), max_tokens=512)["loss"])


def test_leaving_the_guided_phase_frees_the_guides_shards(runs):
    g = json.loads((runs / "guides.json").read_text())
    assert g["guides_left"] == 0 and g["alive"] == 0
    # parameters and both AdamW moments of every guide, summed over the 2 ranks
    assert g["before"] - g["after"] == 3 * g["guides"]


KILLED_SAVE = """
import os, signal, sys, torch
from structlm.runs import checkpoint
from structlm.config import PRESETS
from structlm.model.gpt import GPT
from structlm.runs import dcp
from structlm.training.optim import make_optimizer
cfg = PRESETS["tiny"]()
torch.manual_seed(0)
model = GPT(cfg.model)
opt = make_optimizer(model, cfg.optim)
save = lambda step, write: checkpoint.save_sharded(sys.argv[1], write, cfg, step, {}, 5, True,
                                                   lambda: None)
save(3, lambda d: dcp.save_dcp(d, model, opt))
torch.save(model.state_dict(), sys.argv[1] + "/weights-3.pt")
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
def dying(d):
    dcp.save_dcp(d, model, opt)  # every shard of step 6 written, not yet published
    os.kill(os.getpid(), signal.SIGKILL)
save(6, dying)
"""


def test_a_sharded_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    import torch

    from structlm.config import PRESETS
    from structlm.model.gpt import GPT

    run = tmp_path / "run"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(run)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    assert (run / "checkpoints" / ".tmp_step_0000006" / "dcp" / ".metadata").exists()
    latest = checkpoint.find_latest(run)
    assert latest.name == "step_0000003"
    model = GPT(PRESETS["tiny"]().model)
    checkpoint.load_weights(model, latest)
    saved = torch.load(run / "weights-3.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert checkpoint.clean_leftovers(run) == [run / "checkpoints" / ".tmp_step_0000006"]
