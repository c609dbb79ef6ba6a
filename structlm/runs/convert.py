"""`structlm convert`: a dense structlm run or Hugging Face checkpoint -> a structured run whose
FFN factors are projected from the dense weights (`structure`), ready for `structlm train
--train.init_from` to heal it and `structlm export` to ship it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from structlm._version import __version__
from structlm.config import RunConfig, save_json
from structlm.data.tokenizer import copy_sidecars, encode_text_file
from structlm.linear.registry import DENSE, choose_hparams
from structlm.linear.structure import structure
from structlm.runs import checkpoint
from structlm.runs.importer import HEAL_EVAL_TOKENS, import_hf
from structlm.runs.run import Run
from structlm.utils.files import is_tty, publish_dir, require_empty

DENSE_FILE = "dense_ffn.safetensors"  # the replaced dense FFN weights, by layer name
CALIB_TOKENS = 4096  # tokens of calibration text run through the model (activation-aware)


def convert_run(
    source: str | Path, out_dir: str | Path, kind: str, fraction: float,
    calib_text: str | None = None, allocate: str = "uniform",
) -> tuple[Path, list[dict]]:
    """Write `out_dir`: the source model with every FFN outside model.dense_ffn_layers converted to
    `kind` at `fraction` of the dense FFN's parameters: by the paper's rule for the whole FFN (fc1
    and fc2 share one spec) under allocate="uniform"; under "error" (lowrank) at ranks allocated
    across all FFN linears (`linear.allocate`), kept in the config's model.ffn_overrides. Returns
    (out_dir, the per-layer report)."""
    out = Path(out_dir)
    require_empty(out)
    with tempfile.TemporaryDirectory() as scratch:
        run = Run.open(source)
        if not run.is_structlm:  # a Hugging Face checkpoint: its tokenizer files written out too
            run = Run.open(import_hf(run.path, Path(scratch) / "imported"))
        model, cfg = run.load_model()
        m = cfg.model
        if m.ffn.kind != DENSE:
            raise ValueError(f"convert {source}: its FFNs are {m.ffn.kind} already; convert "
                             "projects a dense model (the run this one came from, or a Hugging "
                             "Face model)")
        spec = choose_hparams(kind, [(n, k) for _, n, k in m.ffn_shapes()], fraction)
        exclude = [f"blocks.{i}.*" for i in m.dense_ffn_layers]
        calib = _calib_ids(calib_text, run, m.block_size) if calib_text else None
        dense = {k.removesuffix(".weight"): v.clone() for k, v in model.state_dict().items()
                 if ".mlp.fc" in k and k.endswith(".weight")}
        layers = 2 * (m.n_layer - len(m.dense_ffn_layers))
        hp = {"rank": spec.rank, "nblocks": spec.nblocks, **spec.params}
        how = (", ".join(f"{k}={v}" for k, v in hp.items() if v is not None)
               if allocate == "uniform" else f"ranks allocated by {allocate} at {fraction:g}")
        print(f"convert: projecting {layers} FFN layers onto {kind} ({how}"
              + (", activation-aware" if calib is not None else "") + ")", flush=True)
        model, report = structure(model, spec if allocate == "uniform" else fraction,
                                  kind=kind, include="blocks.*.mlp.*", exclude=exclude,
                                  calib=calib, progress=is_tty(), allocate=allocate)
        dense = {r["name"]: dense[r["name"]].contiguous() for r in report}  # what was replaced
        new = RunConfig(model=dataclasses.replace(m, ffn=spec, ffn_overrides=_overrides(
            report, spec)), data=cfg.data)
        new.train.eval_tokens = HEAL_EVAL_TOKENS
        new.train.out_dir = str(out)
        tokenizer, origin = run.tokenizer_path, str(Path(source).resolve())

        def write(tmp: Path) -> None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            copy_sidecars(tokenizer.parent, tmp)  # the chat template, when there is one
            checkpoint.save(tmp, model, None, new, 0, {"imported_from": origin})
            save_json(new, str(tmp / "config.json"))
            (tmp / "conversion.json").write_text(json.dumps(
                {"structlm_version": __version__, "source": origin, "layers": report}, indent=2))
            save_file(dense, str(tmp / DENSE_FILE))  # the guides of guided healing

        publish_dir(out, write, "convert")
    return out, report


def _overrides(report: list[dict], spec) -> dict[str, dict[str, int]]:
    """model.ffn_overrides for the report's layers ("blocks.3.mlp.fc1" -> "3.fc1") whose
    hyper-parameters differ from `spec`'s (none under uniform allocation)."""
    out = {}
    for r in report:
        if r["kind"] != spec.kind:
            continue
        hp = {k: r[k] for k in spec.hparams() if r.get(k) != spec.hparams()[k]}
        if hp:
            block, fc = r["name"].split(".")[1], r["name"].rsplit(".", 1)[1]
            out[f"{block}.{fc}"] = hp
    return out


def _calib_ids(path: str, run: Run, block_size: int) -> torch.Tensor:
    ids = encode_text_file(path, run.tokenizer())[:CALIB_TOKENS]
    if len(ids) < 16:
        raise ValueError(f"--calib {path}: only {len(ids)} tokens; give a few thousand")
    n = len(ids) // block_size * block_size or len(ids)
    return torch.as_tensor(ids[:n].astype("int64")).view(-1, min(block_size, n))


def dense_guides_path(run: str | Path) -> Path:
    """Where a converted run keeps the dense weights its FFN layers came from (checked)."""
    path = Path(run) / DENSE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run} has no {DENSE_FILE}: guide_init=dense needs a run made by "
                                "structlm convert as --train.init_from")
    return path


def dense_guides(run: str | Path) -> dict[str, torch.Tensor]:
    """The dense weights a converted run's FFN layers came from, by layer name."""
    return load_file(str(dense_guides_path(run)))
