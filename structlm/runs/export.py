"""structlm run -> a directory transformers loads with no structlm installed, or one GGUF file.

    export_run(run_dir, out_dir, format="hf-merged", dtype="fp32")

`hf`: the structured factors themselves with the self-contained modeling code (hf/remote/) beside
them, loaded with trust_remote_code=True (its base model follows transformers' attention
interface, which vLLM's transformers backend requires). `hf-merged`: every structured FFN layer
folded into its dense matrix (`merge_linears`, the converter seam), then saved as the native
transformers class that computes the same function (`families.family_for`). `gguf`: the merged
model as one Llama GGUF file with its tokenizer (`hf.gguf_writer`), for llama.cpp, ollama and LM
Studio; dtype f32, f16, bf16 or q8_0. The written model is loaded back by transformers and its
logits compared with the structlm model's before the directory (file) is published: an export
that computes something else is never left behind. transformers is an optional extra
(`pip install -e ".[hf]"`, which brings gguf too), imported here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from structlm._version import __version__
from structlm.config import LinearSpec, RunConfig, to_dict
from structlm.data.tokenizer import (
    EOT_CANDIDATES,
    declared_token,
    load_tokenizer,
)
from structlm.hf.families import Unsupported, family_for, hf_config, to_hf
from structlm.hf.gguf_writer import check_gguf_config, write_gguf
from structlm.linear.merge import merge_linears
from structlm.model.flops import param_groups
from structlm.model.mup import fold_scales
from structlm.runs.run import Run
from structlm.utils.files import publish_dir, require_empty, scratch_beside, umask_modes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"f32": "fp32", "f16": "fp16"}  # GGUF's spellings
GGUF_DTYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "q8_0": "q8_0"}  # --dtype -> GGUF
FORMATS = ("hf", "hf-merged", "gguf")
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2, "q8_0": 1e-1}  # of the logits' scale
REMOTE_FILES = ("configuration_structlm.py", "modeling_structlm.py")
REMOTE_DIR = Path(__file__).parent.parent / "hf" / "remote"  # copied beside a --format hf export
AUTO_MAP = {"AutoConfig": "configuration_structlm.StructlmConfig",
            "AutoModel": "modeling_structlm.StructlmModel",  # the base model vLLM's backend wraps
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


def default_format(run_dir: str | Path, out: str | Path | None = None) -> str:
    """gguf for an OUT ending in .gguf; else hf for a run with structured FFN layers (keep the
    savings), hf-merged for a dense one."""
    if out is not None and str(out).endswith(".gguf"):
        return "gguf"
    try:
        return "hf" if Run.open(run_dir).structured else "hf-merged"
    except (FileNotFoundError, ValueError):
        return "hf-merged"  # export_run names what is wrong with the path


def export_run(
    run_dir: str | Path, out_dir: str | Path, format: str = "hf-merged", dtype: str = "fp32",
    check_tokens: int = 16,
) -> Path:
    """Export a run's newest checkpoint (or one checkpoint directory); returns out_dir (for gguf,
    the file). Refuses a non-empty out_dir (an existing file), a model the format does not
    represent exactly (naming the feature), and any result whose logits differ from structlm's."""
    dtype = _check_options(format, DTYPE_ALIASES.get(dtype, dtype))
    out = Path(out_dir)
    if format == "gguf":
        _require_new_gguf(out)
    else:
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
    if format == "gguf":
        return _export_gguf(model, cfg, run, out, dtype, check_tokens)
    return _export_merged(model, cfg, run, out, dtype, check_tokens)


def _check_options(format: str, dtype: str) -> str:
    """The dtype, checked against the format: q8_0 is GGUF's alone."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: choose hf (the structured factors, loaded with "
                         "trust_remote_code=True), hf-merged (a native transformers class) or "
                         "gguf (one Llama GGUF file for llama.cpp, ollama, LM Studio)")
    allowed = GGUF_DTYPES if format == "gguf" else DTYPES
    if dtype not in allowed:
        extra = " (q8_0 is a GGUF quantization: --format gguf)" if dtype in GGUF_DTYPES else ""
        raise ValueError(f"--dtype {dtype!r} with --format {format}: choose one of "
                         f"{sorted(allowed)}{extra}")
    return dtype


def _export_merged(model, cfg: RunConfig, run: Run, out: Path, dtype: str,
                   check_tokens: int) -> Path:
    """--format hf-merged: the structured layers folded into dense matrices, saved as the native
    transformers class that computes the same function."""
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


def _export_gguf(model, cfg: RunConfig, run: Run, out: Path, dtype: str,
                 check_tokens: int) -> Path:
    """--format gguf: the merged model as one Llama GGUF file with its tokenizer and chat
    template, read back by transformers' GGUF loader and compared with structlm before it is
    published."""
    dense_cfg = dataclasses.replace(cfg.model, ffn=LinearSpec())
    try:
        check_gguf_config(dense_cfg)  # before any work
    except Unsupported as e:
        try:
            family_for(dense_cfg)
            other = "--format hf-merged (a native transformers class)"
        except Unsupported:
            other = "--format hf (the model's own code, loaded with trust_remote_code=True)"
        raise Unsupported(f"--format gguf: {e}. Export with {other} instead") from None
    T = _transformers()
    merged = merge_linears(model).float().eval()
    bos, eos = _special_ids(run.tokenizer_path)

    def write(tmp: Path) -> None:
        write_gguf(tmp, merged.state_dict(), dense_cfg, run.tokenizer_path, GGUF_DTYPES[dtype],
                   bos_id=bos, eos_id=eos, name=run.root.name)
        check_parity(T, tmp.parent, model, dense_cfg, check_tokens, dtype, gguf_file=tmp.name)

    return _publish_file(out, write)


def _require_new_gguf(out: Path) -> None:
    """A .gguf path where nothing is yet: an export never replaces a file."""
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: --format gguf writes one file; name it OUT.gguf")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another file name")


def _publish_file(out: Path, write) -> Path:
    """Run write(tmp) for a file in a temporary directory beside `out`, then rename it to `out`:
    a failed or refused write leaves nothing behind (nor does a killed one, after the next)."""
    tmp = scratch_beside(out, "export")
    try:
        write(tmp / out.name)
        umask_modes(tmp)
        _require_new_gguf(out)  # nothing appeared there meanwhile
        (tmp / out.name).rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
        save_file(_factor_tensors(model, dtype), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_tokenizer(tmp, tok_path, cfg)
        (tmp / "README.md").write_text(model_card(cfg, run, "structlm", dtype))
        check_parity(T, tmp, model, cfg.model, check_tokens, dtype, remote=True)

    return publish_dir(out, write, "export")


def _factor_tensors(model, dtype: str) -> dict[str, torch.Tensor]:
    """The structlm state dict under the remote code's names: the transformer under `model.`
    (StructlmModel, the base model), `lm_head.weight` beside it unless tied to the embedding."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # transformers ties it to model.wte.weight on load
        key = name if name == "lm_head.weight" else f"model.{name}"
        out[key] = t.detach().to(DTYPES[dtype]).contiguous().clone()
    return out


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
def check_parity(T, path: Path, model, cfg, tokens: int, dtype: str, remote: bool = False,
                 gguf_file: str | None = None) -> None:
    """Load the written directory (or its GGUF file) with transformers and compare its logits
    with structlm's on a random sequence, within TOLERANCE[dtype] of the logits' scale."""
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                trust_remote_code=remote, **kw).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, min(tokens, cfg.block_size)),
                        generator=torch.Generator().manual_seed(0))
    ref = model.float().eval()(idx)[0]
    got = hf(idx).logits
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    if err > TOLERANCE[dtype]:
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
        f"{list(m.dense_ffn_layers)}"
        + (f", per-linear hyper-parameters for {len(m.ffn_overrides)} linears (allocated); "
           if m.ffn_overrides else "; ")
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
