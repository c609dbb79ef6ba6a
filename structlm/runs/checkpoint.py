"""Checkpoints: atomic, verified, self-describing.

    run_dir/checkpoints/step_000200/
        model.safetensors   weights of the unwrapped, uncompiled model
        state.pt            optimizer, step, RNG states, best val loss, data identity
        config.json         the run's RunConfig
        manifest.json       sha256 + size of the files above (written last)
    run_dir/checkpoints/latest  the name of the newest complete checkpoint

A sharded checkpoint (`--train.parallel fsdp`) holds `dcp/` (every rank's shards of the weights and
the optimizer state, torch.distributed.checkpoint's format, loadable at any world size) instead of
model.safetensors, and no optimizer in state.pt; everything else is the same.

A checkpoint is written into a temporary directory, fsynced, renamed into place, and only then does
`latest` move (also by rename). A reader never sees a half-written checkpoint: a directory without a
manifest, or whose files do not match it, is refused with a message and the previous complete one
is used.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model
from torch import nn

from structlm.config import RunConfig, save_json, to_dict
from structlm.utils.files import atomic_write_text, file_sha256, fsync_path, umask_modes

FORMAT_VERSION = 1
FILES = ("model.safetensors", "state.pt", "config.json")
SHARDED = "dcp"  # the folder of a sharded checkpoint's weights and optimizer state


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, or from a different run)."""


def save(
    run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, cfg: RunConfig,
    step: int, state: dict, keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep_last`; returns its directory.
    A save that fails (disk full, permissions) leaves the previous checkpoints as they were."""
    root, final, tmp = begin(run_dir, step)
    try:
        _write(tmp, model, optimizer, cfg, step, state)
    except OSError as e:
        _failed(tmp, final, e)
    return publish(root, final, tmp, keep_last)


class ShardedSave:
    """A sharded checkpoint being written (collective). Construction: rank 0 prepares the temporary
    directory and every rank starts writing its shards (`write_shards(folder)`, which may return
    a Future: the writing then goes on in the background). `complete()`: wait for every rank's
    shards, then rank 0 adds state.pt, config.json and the manifest and publishes it as `save`
    does. Killed anywhere before the rename, the previous checkpoint stays the one that loads."""

    def __init__(self, run_dir: str | Path, write_shards, cfg: RunConfig, step: int,
                 state: dict, keep_last: int, master: bool, barrier) -> None:
        self.cfg, self.step, self.state, self.keep_last = cfg, step, state, keep_last
        self.master, self.barrier = master, barrier
        self.root, self.final, self.tmp = (begin(run_dir, step) if master
                                           else _paths(run_dir, step))
        barrier()
        self.future = write_shards(self.tmp / SHARDED)

    def complete(self) -> Path:
        if self.future is not None:
            self.future.result()
        self.barrier()
        if self.master:
            try:
                _write(self.tmp, None, None, self.cfg, self.step, {**self.state, "sharded": True})
            except OSError as e:
                _failed(self.tmp, self.final, e)
            publish(self.root, self.final, self.tmp, self.keep_last)
        self.barrier()
        return self.final


def save_sharded(
    run_dir: str | Path, write_shards, cfg: RunConfig, step: int, state: dict, keep_last: int,
    master: bool, barrier,
) -> Path:
    """Collective: the sharded form of `save`, written and published before it returns."""
    return ShardedSave(run_dir, write_shards, cfg, step, state, keep_last, master,
                       barrier).complete()


def _paths(run_dir: str | Path, step: int) -> tuple[Path, Path, Path]:
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    return root, root / name, root / f".tmp_{name}"


def begin(run_dir: str | Path, step: int) -> tuple[Path, Path, Path]:
    """(checkpoints folder, final directory, a fresh temporary directory) for checkpoint `step`;
    what a killed save left there is removed first."""
    root, final, tmp = _paths(run_dir, step)
    old = root / f".old_{final.name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in (tmp, old):  # of a save that was killed; never a complete checkpoint
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir()
    except OSError as e:
        _failed(tmp, final, e)
    return root, final, tmp


def _failed(tmp: Path, final: Path, e: OSError):
    shutil.rmtree(tmp, ignore_errors=True)
    if e.errno == errno.ENOSPC:
        fix = "Free disk space and resume"
    elif isinstance(e, PermissionError):
        fix = "Fix the directory's permissions and resume"
    else:  # e.g. a file another process removed or renamed under this one
        fix = ("Check that no other command writes into this run (structlm train locks it; a "
               "copy or a script may not) and resume")
    raise CheckpointError(
        f"could not write checkpoint {final} ({e}); the earlier checkpoints in {final.parent} "
        f"are intact. {fix}"
    ) from None


def publish(root: Path, final: Path, tmp: Path, keep_last: int) -> Path:
    """Rename the complete `tmp` into place, point `latest` at it, drop all but `keep_last`."""
    old = root / f".old_{final.name}"
    if final.exists():  # the same step saved again: move the old copy aside, delete it afterwards
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    if old.exists():
        shutil.rmtree(old)
    atomic_write_text(root / "latest", final.name)
    for stale in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(stale)
    return final


def _write(
    tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, cfg: RunConfig,
    step: int, state: dict,
) -> None:
    """The checkpoint's files into `tmp`, fsynced, the manifest last (`model` None: the weights are
    already in tmp/dcp)."""
    if model is not None:
        save_model(model, str(tmp / "model.safetensors"))
    full_state = {
        "version": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": {"torch": torch.get_rng_state()},
        **state,
    }
    if torch.cuda.is_available():
        full_state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(full_state, tmp / "state.pt")
    save_json(cfg, str(tmp / "config.json"))
    umask_modes(tmp)  # safetensors writes its file private; a checkpoint is the user's to share
    manifest = {"version": FORMAT_VERSION, "step": step, "files": {}}
    tokenizer = tmp.parent.parent / "tokenizer.json"  # the run's, beside checkpoints/
    if tokenizer.is_file():  # what identifies it: a run opened later checks its copy against it
        manifest["tokenizer_sha256"] = file_sha256(tokenizer)
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        f = p.relative_to(tmp).as_posix()
        fsync_path(p)
        manifest["files"][f] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    if (tmp / SHARDED).is_dir():
        fsync_path(tmp / SHARDED)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    fsync_path(tmp / "manifest.json")
    fsync_path(tmp)


def clean_leftovers(run_dir: str | Path) -> list[Path]:
    """Remove what killed saves left in run_dir/checkpoints (.tmp_*, .old_*); returns them."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    gone = sorted([*root.glob(".tmp_step_*"), *root.glob(".old_step_*")])
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file of `ckpt` matches its manifest."""
    man_path = ckpt / "manifest.json"
    if not man_path.exists():
        raise CheckpointError(
            f"checkpoint {ckpt} is incomplete (no manifest.json): it was not fully written"
        )
    try:
        files = json.loads(man_path.read_text())["files"]
        entries = [(ckpt / f, int(m["bytes"]), str(m["sha256"])) for f, m in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt} has an unreadable manifest {man_path} ({type(e).__name__}: {e})"
        ) from None
    if not _complete({p.relative_to(ckpt).as_posix() for p, _, _ in entries}):
        raise CheckpointError(f"checkpoint manifest {man_path} does not list {list(FILES)} (or "
                              f"state.pt, config.json and {SHARDED}/.metadata)")
    for p, size, sha in entries:
        if not p.exists() or p.stat().st_size != size or file_sha256(p) != sha:
            raise CheckpointError(
                f"checkpoint file {p} is missing, truncated or modified "
                "(does not match manifest.json); "
                "delete this checkpoint directory to fall back to an earlier one"
            )


def _complete(names: set[str]) -> bool:
    """The manifest of a single-file or of a sharded checkpoint."""
    return names == set(FILES) or (
        {"state.pt", "config.json", f"{SHARDED}/.metadata"} <= names
        and all(n in ("state.pt", "config.json") or n.startswith(f"{SHARDED}/") for n in names))


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / SHARDED).is_dir()


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete, verified checkpoint of a run, or None if it has none.

    Follows `latest`; if that is missing or broken (a save killed mid-way), falls back to the newest
    checkpoint directory that verifies. A corrupt checkpoint is reported, never loaded.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for ckpt in candidates:
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return None


def load_state(ckpt: Path, verified: bool = False) -> dict:
    """The training state of a checkpoint, verified against its manifest first unless the caller
    already did (`verified`)."""
    if not verified:
        verify(ckpt)
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load weights strictly (into an unsharded model; from a single-file or a sharded
    checkpoint); shape or name mismatches are refused with the checkpoint named."""
    if is_sharded(ckpt):
        return _load_sharded_weights(model, ckpt)
    try:
        missing, unexpected = load_safetensors(model, str(ckpt / "model.safetensors"),
                                               strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def _load_sharded_weights(model: nn.Module, ckpt: Path) -> None:
    from structlm.runs.dcp import dcp_model_keys, load_dcp

    have, want = dcp_model_keys(ckpt / SHARDED), set(model.state_dict())
    if have != want:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit this model: missing {sorted(want - have)[:5]}, "
            f"unexpected {sorted(have - want)[:5]}"
        )
    load_dcp(ckpt / SHARDED, model, None)


def weight_names(ckpt: Path) -> set[str]:
    """The names of a checkpoint's weights, read from its header or metadata only."""
    if is_sharded(ckpt):
        from structlm.runs.dcp import dcp_model_keys

        return dcp_model_keys(ckpt / SHARDED)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return set(f.keys())


def config_diff(a: RunConfig, b: RunConfig, paths=("model", "data", "optim")) -> list[str]:
    """Dotted paths (with both values) where the given parts of two configs differ; `paths` name
    sections ("model") or fields ("train.seed")."""
    out: list[str] = []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
        elif x != y:
            out.append(f"{path}: {x!r} vs {y!r}")

    def get(d, path):
        for k in path.split("."):
            d = d[k]
        return d

    da, db = to_dict(a), to_dict(b)
    for p in paths:
        walk(get(da, p), get(db, p), p)
    return out
