"""structlm run -> a directory transformers loads with no structlm installed.

    export_run(run_dir, out_dir, format="hf-merged", dtype="fp32")

`hf-merged`: every structured FFN layer folded into its dense matrix (`merge_linears`, the
converter seam), then saved as the native transformers class that computes the same function
(`families.family_for`). The written model is loaded back and its logits compared with the
structlm model's before the directory is published: an export that computes something else is
never left behind. transformers is an optional extra (`pip install -e ".[hf]"`), imported here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model

from structlm._version import __version__
from structlm.config import LinearSpec, RunConfig, to_dict
from structlm.data.tokenizer import (
    EOT_CANDIDATES,
    declared_token,
    load_tokenizer,
)
from structlm.hf.families import Unsupported, family_for, hf_config, to_hf
from structlm.linear.merge import merge_linears
from structlm.model.flops import param_groups
from structlm.model.mup import fold_scales
from structlm.runs.run import Run
from structlm.utils.files import publish_dir, require_empty

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REMOTE_FILES = ("configuration_structlm.py", "modeling_structlm.py")
REMOTE_DIR = Path(__file__).parent.parent / "hf" / "remote"  # copied beside a --format hf export
AUTO_MAP = {"AutoConfig": "configuration_structlm.StructlmConfig",
            "AutoModelForCausalLM": "modeling_structlm.StructlmForCausalLM"}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
           "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM")}


def _transformers():
    try:
        import transformers  # optional extra: only export needs it
    except ImportError:
        raise ImportError(
            "structlm export needs transformers: pip install -e \".[hf]\" (or pip install "
            "transformers)"
        ) from None
    return transformers


def default_format(run_dir: str | Path) -> str:
    """hf for a run with structured FFN layers (keep the savings), hf-merged for a dense one."""
    try:
        return "hf" if Run.open(run_dir).structured else "hf-merged"
    except (FileNotFoundError, ValueError):
        return "hf-merged"  # export_run names what is wrong with the path


def export_run(
    run_dir: str | Path, out_dir: str | Path, format: str = "hf-merged", dtype: str = "fp32",
    check_tokens: int = 16,
) -> Path:
    """Export a run's newest checkpoint (or one checkpoint directory); returns out_dir. Refuses a
    non-empty out_dir, a model no native class represents exactly (naming the feature), and any
    result whose logits differ from structlm's."""
    if format not in ("hf", "hf-merged"):
        raise ValueError(f"--format {format!r}: choose hf (the structured factors, loaded with "
                         "trust_remote_code=True) or hf-merged (a native transformers class)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out_dir)
    require_empty(out)
    run = Run.open(run_dir)
    if not run.is_structlm:
        raise ValueError(f"{run_dir} is a Hugging Face model already; import it first (structlm "
                         "import) to export a structlm run of it")
    model, cfg = run.load_model()
    model = fold_scales(model)  # muP's attention and logit factors into the weights
    cfg = dataclasses.replace(cfg, model=model.cfg,  # a standard model from here on
                              optim=dataclasses.replace(cfg.optim, param_scaling="standard"))
    if format == "hf":
        return _export_factors(_transformers(), model, cfg, run, out, dtype, check_tokens)
    dense_cfg = dataclasses.replace(cfg.model, ffn=LinearSpec())
    try:
        family = family_for(dense_cfg)  # refuses what no native class computes, before any work
    except Unsupported as e:
        raise Unsupported(f"--format hf-merged: {e}. Export with --format hf instead (the "
                          "model's own code, loaded with trust_remote_code=True)") from None
    T = _transformers()
    merged = merge_linears(model).float().eval()
    hf_model = _build(T, family, dense_cfg, merged.state_dict(), run.tokenizer_path)

    def write(tmp: Path) -> None:
        hf_model.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        _write_tokenizer(tmp, run.tokenizer_path, cfg)
        (tmp / "README.md").write_text(model_card(cfg, run, family, dtype))
        check_parity(T, tmp, model, dense_cfg, check_tokens, dtype)

    return publish_dir(out, write, "export")


def _export_factors(T, model, cfg: RunConfig, run: Run, out: Path, dtype: str,
                    check_tokens: int) -> Path:
    """--format hf: the structured factors as they are, with the self-contained modeling code
    (structlm/hf/remote/) copied beside them for trust_remote_code=True."""
    from structlm.hf.remote.configuration_structlm import StructlmConfig  # needs transformers

    tok_path = run.tokenizer_path
    bos, eos = _special_ids(tok_path)
    conf = StructlmConfig(structlm=to_dict(cfg.model), bos_token_id=bos, eos_token_id=eos,
                          architectures=["StructlmForCausalLM"], auto_map=AUTO_MAP)

    def write(tmp: Path) -> None:
        conf.save_pretrained(tmp)
        T.GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(tmp)
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, tmp / name)
        weights = copy.deepcopy(model).to(DTYPES[dtype])
        save_model(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_tokenizer(tmp, tok_path, cfg)
        (tmp / "README.md").write_text(model_card(cfg, run, "structlm", dtype))
        check_parity(T, tmp, model, cfg.model, check_tokens, dtype, remote=True)

    return publish_dir(out, write, "export")


def _build(T, family: str, cfg, sd: dict, tokenizer_path: Path):
    conf_cls, model_cls = (getattr(T, n) for n in CLASSES[family])
    bos, eos = _special_ids(tokenizer_path)
    conf = conf_cls(**hf_config(cfg, family), bos_token_id=bos, eos_token_id=eos,
                    architectures=[CLASSES[family][1]])
    with torch.device("meta"):
        hf_model = model_cls(conf)
    missing, unexpected = hf_model.load_state_dict(to_hf(sd, cfg, family), strict=False,
                                                   assign=True)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export mapping for {family} is incomplete: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def _special_tokens(tokenizer_path: Path) -> dict[str, str]:
    """eos/bos as the tokenizer's own files declare them (an imported model's), else its
    end-of-text token for both."""
    tok = load_tokenizer(tokenizer_path)
    eot = next((t for t in EOT_CANDIDATES if tok.token_to_id(t) is not None), None)
    out = {}
    for key in ("eos_token", "bos_token"):
        t = declared_token(tokenizer_path, key)
        t = t if t is not None and tok.token_to_id(t) is not None else eot
        if t is not None:
            out[key] = t
    return out


def _special_ids(tokenizer_path: Path) -> tuple[int | None, int | None]:
    """(bos id, eos id) of `_special_tokens`."""
    tok, special = load_tokenizer(tokenizer_path), _special_tokens(tokenizer_path)
    ids = [tok.token_to_id(special[k]) if k in special else None
           for k in ("bos_token", "eos_token")]
    return ids[0], ids[1]


def _write_tokenizer(out: Path, tokenizer_path: Path, cfg: RunConfig) -> None:
    """tokenizer.json plus what AutoTokenizer needs: the tokenizer's own tokenizer_config.json
    (chat template, special tokens) and generation_config.json where it has them (an imported
    model), else a config naming the end-of-text token."""
    src = tokenizer_path.parent
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    for name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    if (src / "tokenizer_config.json").exists():
        conf = json.loads((src / "tokenizer_config.json").read_text())
        conf["model_max_length"] = cfg.model.block_size
    else:
        special = _special_tokens(tokenizer_path)
        if "eos_token" in special:
            special["unk_token"] = special["eos_token"]
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                "model_max_length": cfg.model.block_size, **special}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))


@torch.no_grad()
def check_parity(T, path: Path, model, cfg, tokens: int, dtype: str, remote: bool = False) -> None:
    """Load the written directory with transformers and compare its logits with structlm's on a
    random sequence; fp32 must agree to 1e-4 of the logits' scale (bf16/fp16: 5e-2)."""
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                trust_remote_code=remote).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, min(tokens, cfg.block_size)),
                        generator=torch.Generator().manual_seed(0))
    ref = model.float().eval()(idx)[0]
    got = hf(idx).logits
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    if err > (1e-4 if dtype == "fp32" else 5e-2):
        raise RuntimeError(f"the exported model's logits differ from structlm's by {err:.2e} of "
                           "their scale; nothing was written (please report this)")


def model_card(cfg: RunConfig, run: Run, family: str, dtype: str) -> str:
    """A short README.md: what the model is, how it was trained, how it was made."""
    m, g = cfg.model, param_groups(cfg.model)
    summary = run.root / "summary.json"
    s = json.loads(summary.read_text()) if summary.exists() else {}
    spec = ", ".join(f"{k}={v}" for k, v in m.ffn.hparams().items())
    lines = [
        f"# {run.root.name}",
        "",
        f"A {m.n_layer}-layer, d={m.d_model} GPT trained with structlm, exported as "
        f"`{CLASSES.get(family, ('', 'StructlmForCausalLM'))[1]}` ({dtype}).",
        "",
        f"- FFN structure: `{m.ffn.kind}`{f' ({spec})' if spec else ''}, dense in blocks "
        f"{list(m.dense_ffn_layers)}; "
        + ("kept as factors: load with `trust_remote_code=True`." if family == "structlm"
           else "here folded into dense matrices (hf-merged)."),
        f"- structlm parameters: {g['total']:,} ({g['ffn']:,} in FFNs); this export holds "
        + ("the factors themselves." if family == "structlm" else "the merged dense FFNs."),
        f"- {m.norm}, {m.act}, {m.pos_emb} positions, {m.n_head} heads ({m.kv_heads} K/V), "
        f"vocabulary {m.vocab_size}, context {m.block_size}.",
    ]
    if s:
        lines.append(f"- Trained on {s['tokens']:,} tokens; validation loss "
                     f"{s['final_val_loss']:.4f} (perplexity {s['final_val_ppl']:.2f}).")
    fmt = "hf" if family == "structlm" else "hf-merged"
    lines += ["", f"Made with structlm {__version__}: `structlm export {run.path} OUT_DIR "
              f"--format {fmt} --dtype {dtype}`.", ""]
    return "\n".join(lines)
