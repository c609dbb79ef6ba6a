"""One handle for anything a model can be loaded from: `Run.open(path)` looks at the path once.

    Run.open("runs/small")                       a run directory: its newest complete checkpoint
    Run.open("runs/small/checkpoints/step_0000200")  one checkpoint directory
    Run.open("SmolLM2-135M/")                    a Hugging Face directory (config.json, safetensors)
    Run.open("model.gguf")                       a GGUF file (or a directory holding one)

and answers what it is (`kind`), which checkpoint it loads (`ckpt`), its config, its weights as a
model (`load_model`), its tokenizer, special tokens and chat template. Every loader (generate,
eval, serve, export, convert, --train.init_from) goes through it, so the checks (does it exist,
is the checkpoint complete, is it inside the self-guided phase) are written once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from structlm.config import ModelConfig, RunConfig, load_run_config
from structlm.data.tokenizer import declared_token, load_tokenizer, stop_id
from structlm.hf.reader import gguf_file, read_config, read_hf
from structlm.linear.registry import DENSE
from structlm.model.gpt import GPT
from structlm.runs.checkpoint import (
    CheckpointError,
    find_latest,
    is_sharded,
    load_weights,
    verify,
    weight_names,
)
from structlm.utils.files import file_sha256

Kind = Literal["run", "checkpoint", "hf", "gguf"]


@dataclass(frozen=True)
class Run:
    """A path opened as one of the Kinds. `root` holds the tokenizer files (the run directory for a
    checkpoint inside one); `ckpt` is the verified checkpoint a structlm run or checkpoint loads
    (None for Hugging Face sources)."""

    path: Path
    kind: Kind
    root: Path
    ckpt: Path | None = None

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """The source at `path`, or an error that names what is there instead and what to do."""
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: give a run directory, a checkpoint "
                                    "directory, a Hugging Face model directory or a .gguf file")
        if (p / "manifest.json").is_file():  # one checkpoint directory
            verify(p)
            run_dir = p.parent.parent
            return cls(p, "checkpoint", run_dir if (run_dir / "config.json").exists() else p, p)
        if _is_hf_dir(p):
            return cls(p, "hf", p)
        gguf = gguf_file(p) if p.suffix == ".gguf" or p.is_dir() else None
        if gguf is not None:
            return cls(gguf, "gguf", gguf.parent)
        if p.is_file():
            raise ValueError(f"{p} is a file; give a run directory, a checkpoint directory, a "
                             "Hugging Face model directory or a .gguf file")
        ckpt = find_latest(p)  # verified
        if ckpt is None:
            what = ("a run" if (p / "config.json").exists() else "no structlm run, Hugging Face "
                    "model or GGUF file")
            raise FileNotFoundError(f"{p} holds {what} with no complete checkpoint; train it "
                                    "first (structlm train)")
        return cls(p, "run", p, ckpt)

    @property
    def is_structlm(self) -> bool:
        return self.kind in ("run", "checkpoint")

    @cached_property
    def config(self) -> RunConfig:
        """The run's config (its checkpoint's); for a Hugging Face source, its model in a default
        RunConfig. A GGUF file's config comes with its weights (`load_model`)."""
        if self.is_structlm:
            return load_run_config(str(self.ckpt / "config.json"))
        if self.kind == "hf":
            return RunConfig(model=read_config(self.path)[0])
        raise ValueError(f"{self.path}: a GGUF file's config is read with its weights; import it "
                         f"first (structlm import {self.path} runs/NAME)")

    @property
    def structured(self) -> bool:
        """Whether any FFN layer of the model is structured (not dense)."""
        m = self.config.model
        return any(m.ffn_spec(i).kind != DENSE for i in range(m.n_layer))

    def load_model(self, device=None) -> tuple[nn.Module, RunConfig]:
        """(the model in eval mode, its config). A checkpoint saved inside the self-guided phase is
        refused: its dense guides are still mixed in."""
        if self.is_structlm:
            if any(k.endswith(".guide") for k in weight_names(self.ckpt)):
                raise CheckpointError(
                    f"{self.ckpt} was saved inside the self-guided phase (the dense guides are "
                    "still mixed in); evaluate or serve a checkpoint from after the guided "
                    "steps, or finish training first")
            cfg = self.config
            if is_sharded(self.ckpt):
                model = GPT(cfg.model)
                load_weights(model, self.ckpt)
            else:
                model = skeleton_with(cfg.model, load_file(str(self.ckpt / "model.safetensors")),
                                      self.ckpt)
        else:
            model_cfg, sd = read_hf(self.path)
            cfg = RunConfig(model=model_cfg)
            model = skeleton_with(model_cfg, sd, self.path)
        if device is not None:
            model.to(device)
        return model.eval(), cfg

    @cached_property
    def tokenizer_path(self) -> Path:
        """The tokenizer.json beside the model (a run keeps a copy; a GGUF file carries its own,
        which `structlm import` writes out)."""
        tok = self.root / "tokenizer.json"
        if tok.is_file():
            self._check_tokenizer(tok)
            return tok
        if self.kind == "gguf":
            raise FileNotFoundError(f"{self.path}: a GGUF file's tokenizer is inside it; import "
                                    f"it first (structlm import {self.path} runs/NAME)")
        raise FileNotFoundError(f"{self.root} has no tokenizer.json; was it trained by structlm "
                                "train (or saved with its tokenizer)?")

    def _check_tokenizer(self, tok: Path) -> None:
        """The run's tokenizer.json is the one its checkpoint was saved with (the manifest
        records its sha256; checkpoints older than that record are taken on trust)."""
        if self.ckpt is None:
            return
        want = json.loads((self.ckpt / "manifest.json").read_text()).get("tokenizer_sha256")
        if want and file_sha256(tok) != want:
            raise ValueError(f"{tok} is not the tokenizer {self.ckpt} was saved with (its sha256 "
                             f"differs from the {want[:12]}... the checkpoint records): another "
                             "model's tokenizer would turn its ids into the wrong text. Restore "
                             "the run's own tokenizer.json")

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def special_token(self, key: str) -> str | None:
        """The special token ("eos_token", "bos_token") its tokenizer_config.json declares."""
        return declared_token(self.tokenizer_path, key)

    def stop_id(self, tok: Tokenizer) -> int:
        """The id generation stops at: the declared eos (an instruct model's end of turn), else
        the end-of-text token, else 0."""
        found = stop_id(tok, self.tokenizer_path)  # falls back to the end-of-text token itself
        return 0 if found is None else found

    def chat_template(self) -> str | None:
        """The chat template of its tokenizer files (tokenizer_config.json's, or
        chat_template.jinja), or None."""
        conf = self.root / "tokenizer_config.json"
        meta = json.loads(conf.read_text()) if conf.exists() else {}
        tpl = meta.get("chat_template")
        if isinstance(tpl, list):  # several named templates: the default one
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        jinja = self.root / "chat_template.jinja"
        if tpl is None and jinja.exists():
            tpl = jinja.read_text()
        return tpl


def _is_hf_dir(p: Path) -> bool:
    """A directory whose config.json is a transformers config (it names a model_type)."""
    conf = p / "config.json"
    if not (p.is_dir() and conf.is_file()):
        return False
    try:
        return "model_type" in json.loads(conf.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_model(path: str | Path, device=None) -> tuple[nn.Module, RunConfig]:
    """The model (eval mode) and config of a run, checkpoint, Hugging Face directory or GGUF file:
    `Run.open(path).load_model(device)`."""
    return Run.open(path).load_model(device)


def skeleton_with(cfg: ModelConfig, sd: dict[str, torch.Tensor], source) -> GPT:
    """GPT(cfg) holding the tensors of `sd`, built on the meta device so that no initialisation
    runs (a structured layer's init can take a while: LowRank's takes an SVD per layer, all of it
    overwritten by the checkpoint); names and shapes must match exactly."""
    with torch.device("meta"):
        model = GPT(cfg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # fp32 masters
    if cfg.tie_embeddings:  # one tensor under two names: the file keeps only one of them
        shared = sd.get("wte.weight", sd.get("lm_head.weight"))
        sd = {**sd, "wte.weight": shared, "lm_head.weight": shared}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit its model: {str(e)[:500]}") from None
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model
