"""Training: `train(cfg) -> Summary`, the paper's recipe (SPEC §6.3) as one readable loop.

    for step in range(start, total_steps):
        lr = lr_at(step, cfg.optim, total_steps)     # linear warm-up, cosine to 0.1 x peak
        for micro in range(grad_accum):               # this rank's contiguous slice of the batch
            loss = model(x, y) / grad_accum; loss.backward()
        clip_grad_norm_(1.0); optimizer.step()
        every log_interval: one line + metrics.jsonl row; every eval_interval: evaluate + checkpoint

Data order is a pure function of (seed, step), so a resumed run, a DDP rank and an uninterrupted run
read the same rows. Under `torchrun` the model is wrapped in DDP here (gloo on CPU, nccl on CUDA);
model.py knows nothing of it. Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from structlm import checkpoint
from structlm.config import OptimConfig, RunConfig, load_run_config, save_json, to_dict
from structlm.data import Batches, eval_batches, load_meta, load_tokens, prepare, resolve_data_dir
from structlm.evaluate import evaluate_sums
from structlm.flops import flops_per_token, param_groups, tokens_for_budget
from structlm.linear.guided import guided_layers, set_guide, unwrap_guided, wrap_guided
from structlm.model import GPT
from structlm.sgt import guide_alpha, guide_draws, make_plan
from structlm.utils import autocast, autocast_dtype, autodetect_device, dist_info, is_tty, seed_all


@dataclass
class Summary:
    """The result of a run, also written to run_dir/summary.json (the contract with
    scaling/report)."""

    out_dir: str
    steps: int
    tokens: int
    train_flops: float
    flops_per_token: int
    param_groups: dict
    final_val_loss: float
    final_val_ppl: float
    best_val_loss: float
    final_train_loss: float
    wall_time_s: float
    sgt: dict
    tokens_per_s: float
    device: str
    dtype: str
    torch_version: str
    world_size: int
    config: dict


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over warmup_frac of the steps to cfg.lr, then cosine to min_lr_ratio * lr
    (SPEC §6.3)."""
    warmup = int(cfg.warmup_frac * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor = cfg.min_lr_ratio * cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; decay on every parameter as in the paper, or (decay_all=False) only on >=2-D
    tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_all:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def drop_params(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Remove `params` and their state (AdamW moments) from `optimizer`, freeing that memory."""
    ids = {id(p) for p in params}
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)


def total_steps(cfg: RunConfig) -> int:
    """Optimizer steps from the budget: steps, tokens (int(tokens / tokens_per_step)) or training
    FLOPs."""
    t = cfg.train
    per_step = t.batch_size * cfg.seq_len
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        tokens = t.max_tokens
    elif t.max_flops is not None:
        tokens = tokens_for_budget(cfg.model, t.max_flops, cfg.seq_len)
    else:
        raise ValueError("no training budget: set --train.max_steps, --train.max_tokens or "
                         "--train.max_flops")
    steps = int(tokens // per_step)
    if steps < 1:
        raise ValueError(f"the budget gives {tokens:.3g} tokens, less than one step of "
                         f"{per_step} tokens")
    return steps


# fields that define a run's trajectory: a run directory is resumed only under the same values (the
# budget, logging, evaluation and checkpoint cadence may change, e.g. to extend a finished run)
RUN_IDENTITY = ("model", "data", "optim", "train.seed", "train.batch_size", "train.seq_len",
                "train.dtype", "train.sgt")


def check_run_dir(out: Path, cfg: RunConfig) -> bool:
    """True if `out` holds this same run (to resume); refuse a directory that holds something
    else."""
    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / "config.json").exists():
        raise FileExistsError(
            f"{out} exists and is not a structlm run directory; choose another --train.out_dir"
        )
    diff = checkpoint.config_diff(load_run_config(str(out / "config.json")), cfg, RUN_IDENTITY)
    if diff:
        raise FileExistsError(
            f"{out} holds a different run (differs in {'; '.join(diff[:4])}). Use another "
            f"--train.out_dir, or continue that run with `structlm train --resume {out}`"
        )
    return True


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows logged after `step` by a run that died before its next checkpoint."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)


def train(cfg: RunConfig, *, progress: bool | None = None) -> Summary:
    """Train (or resume) the run described by cfg; returns its Summary (also written to
    summary.json)."""
    rank, local_rank, world = dist_info()
    ddp = world > 1
    master = rank == 0
    device = autodetect_device(cfg.train.device)
    if ddp:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    amp = autocast_dtype(device, cfg.train.dtype)
    progress = (is_tty() if progress is None else progress) and master
    t = cfg.train
    seq = cfg.seq_len
    tokens_per_step = t.batch_size * seq
    plan = make_plan(t.sgt, cfg.model, total_steps(cfg), tokens_per_step, seq)
    steps = plan.total_steps  # S, or S + G for fixedflop self-guided training
    if t.batch_size % (world * t.micro_batch_size):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be a multiple of world_size*micro_batch_size="
            f"{world}*{t.micro_batch_size}; adjust --train.micro_batch_size"
        )
    accum = t.batch_size // (world * t.micro_batch_size)
    per_rank = t.batch_size // world

    # --- the run directory and its checkpoint, then the data; all checked before any work ---
    out = Path(t.out_dir)
    resuming = check_run_dir(out, cfg)
    ckpt = checkpoint.find_latest(out) if resuming else None
    if resuming and ckpt is None and any((out / "checkpoints").glob("step_*")):
        raise checkpoint.CheckpointError(
            f"{out} has checkpoints but none is complete and intact (see the warnings above); "
            "restore one or delete the checkpoints directory to start over"
        )
    state = checkpoint.load_state(ckpt, verify=False) if ckpt is not None else {"step": 0}
    start = state["step"]
    if ckpt is not None:
        if start > steps:
            raise ValueError(
                f"{out} is at step {start}, beyond the budget of {steps} steps; raise it"
            )
        saved = state.get("sgt_plan")
        if plan.mode != "off" and saved and (saved["base_steps"], saved["guided_steps"]) != (
            plan.base_steps, plan.guided_steps
        ):
            raise ValueError(
                f"{out} was planned with S={saved['base_steps']}, G={saved['guided_steps']} "
                f"self-guided steps; this budget gives S={plan.base_steps}, G={plan.guided_steps}. "
                "Keep the budget"
            )
    if cfg.data.tokenizer is None and cfg.data.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"data.vocab_size={cfg.data.vocab_size} exceeds "
            f"model.vocab_size={cfg.model.vocab_size}; "
            f"set --model.vocab_size {cfg.data.vocab_size}"
        )
    data_dir = resolve_data_dir(cfg.data)
    # a resumed run uses its prepared data as it is (checked by hash below)
    if master and ckpt is None:
        prepare(cfg.data, progress=progress)
    if ddp:
        dist.barrier()
    meta = load_meta(data_dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(
            f"the data in {data_dir} has a vocabulary of {meta['vocab_size']} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}; set --model.vocab_size {meta['vocab_size']}"
        )
    if ckpt is not None and state.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
        raise checkpoint.CheckpointError(
            f"checkpoint {ckpt} was trained with a different tokenizer than the data in "
            f"{data_dir}; point --data.data_dir at the run's own data"
        )
    train_data = Batches(load_tokens(data_dir, "train"), seq, t.batch_size, t.seed)
    val_tokens = load_tokens(data_dir, "val")

    # --- model, optimizer, resume ---
    seed_all(t.seed)
    model = GPT(cfg.model).to(device)
    guided = plan.guided(start)  # the guides exist only during the guided phase
    if guided:
        wrap_guided(model, t.sgt.guide_init)
    optimizer = make_optimizer(model, cfg.optim)
    best_val, loss_acc, n_acc = float("inf"), 0.0, 0
    if ckpt is not None:
        if start >= steps and (out / "summary.json").exists():
            if master:
                print(f"{out} already finished ({start} steps); "
                      "use another --train.out_dir for a new run")
            return Summary(**json.loads((out / "summary.json").read_text()))
        checkpoint.load_weights(model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        best_val = state["best_val"]
        loss_acc, n_acc = state.get("log_acc", (0.0, 0))  # train loss of steps not yet logged
        if master:
            print(f"resuming {out} from {ckpt.name} (step {start}/{steps})", flush=True)
            _truncate_metrics(out / "metrics.jsonl", start)
    elif resuming and master and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a run that died before its first checkpoint starts over
    if master:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, str(out / "config.json"))
        shutil.copyfile(Path(data_dir) / "tokenizer.json", out / "tokenizer.json")
    raw_model = model

    def wrap(m: nn.Module) -> nn.Module:
        """DDP (and compile) around the raw model; redone when the guides are removed."""
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [local_rank] if device.type == "cuda" else None
            # under reduce_flop a skipped guide gets no gradient in that step
            m = DistributedDataParallel(m, device_ids=ids, find_unused_parameters=guided)
        return torch.compile(m) if t.compile else m

    model = wrap(raw_model)
    groups = param_groups(cfg.model)
    fpt = flops_per_token(cfg.model, seq)["total"]
    if master and start == 0:
        sgt_note = ""
        if plan.guided_steps:
            sgt_note = (f" | SGT {plan.mode}: {plan.guided_steps} guided steps (ratio "
                        f"{plan.ratio:.3f}), dense model: {plan.dense_train_flops:.2e} FLOPs")
        print(
            f"model: {groups['total']:,} params ({groups['ffn']:,} FFN, {cfg.model.ffn.kind}) | "
            f"{steps} steps x {tokens_per_step:,} tokens = "
            f"{steps * tokens_per_step / 1e6:.1f}M tokens | "
            f"{plan.train_flops:.2e} FLOPs{sgt_note} | {device}, {amp or 'fp32'}, world {world}",
            flush=True,
        )

    def run_eval(max_tokens: int | None, step: int) -> float:
        if guided:  # mid-guided phase: every guide on, at the alpha of the next step
            set_guide(raw_model, guide_alpha(step, plan.guided_steps, t.sgt.schedule))
        batches = eval_batches(val_tokens, seq, t.micro_batch_size, max_tokens)
        # the raw model: no DDP collectives in eval, so ranks with fewer batches cannot hang
        s, n = evaluate_sums(raw_model, islice(batches, rank, None, world), device, amp)
        if ddp:
            buf = torch.tensor([s, n], dtype=torch.float64, device=device)
            dist.all_reduce(buf)
            s, n = buf.tolist()
        return s / max(n, 1)

    def save(step: int) -> None:
        if master:
            state = {"best_val": best_val, "tokenizer_sha256": meta["tokenizer_sha256"],
                     "sgt_plan": asdict(plan), "log_acc": (loss_acc, n_acc)}
            checkpoint.save(out, raw_model, optimizer, cfg, step, state, t.keep_last)

    # no `with` block: log() appends to it across the whole loop; closed at the end of train()
    metrics = open(out / "metrics.jsonl", "a") if master else None  # noqa: SIM115
    writer = _tensorboard(out) if master and t.tensorboard else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True)

    def log(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "split", "tokens"):
                    writer.add_scalar(f"{row['split']}/{k}", v, row["step"])

    model.train()
    t0, t_log, train_loss = time.time(), time.time(), float("nan")
    for step in range(start, steps):
        alpha = guide_alpha(step, plan.guided_steps, t.sgt.schedule)
        lr = lr_at(step, cfg.optim, steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            if guided:
                n = len(guided_layers(raw_model))
                draws = guide_draws(t.seed, step, micro, n, alpha) if t.sgt.reduce_flop else None
                set_guide(raw_model, alpha, draws)
            row = rank * per_rank + micro * t.micro_batch_size
            x, y = train_data.rows(plan.data_step(step), row, t.micro_batch_size)
            x, y = x.to(device), y.to(device)
            sync = not ddp or micro == accum - 1  # all-reduce gradients only on the last micro-step
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, autocast(device, amp):
                _, loss = model(x, y)
            # the micro-batch losses are averaged: each contributes 1/accum of the step's gradient
            (loss / accum).backward()
            loss_sum += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                               cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        # alpha is 0 from here: drop the guides and their AdamW state
        if guided and not plan.guided(done):
            drop_params(optimizer, unwrap_guided(raw_model))
            guided = False
            model = wrap(raw_model)
        if ddp:  # the mean over ranks, so every rank logs and NaN-checks the same number
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss_acc += loss_sum.item() / accum  # .item() syncs with the device once per step
        n_acc += 1
        if not math.isfinite(loss_acc):
            last = checkpoint.find_latest(out)
            raise FloatingPointError(
                f"loss became {loss_acc / n_acc} at step {step}; stopping. The last good "
                f"checkpoint is {last or 'none'}; lower --optim.lr or use --train.dtype fp32 and "
                "resume"
            )
        if done % t.log_interval == 0 or done == steps:
            train_loss = loss_acc / n_acc
            dt = time.time() - t_log
            tok_s = n_acc * tokens_per_step / dt
            if master:
                log({"step": done, "split": "train", "loss": train_loss, "lr": lr,
                     "gnorm": gnorm.item(), "tokens": done * tokens_per_step, "tok_per_s": tok_s,
                     "ms_per_step": 1e3 * dt / n_acc})
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
                else:
                    print(f"step {done:>6}/{steps} | loss {train_loss:.4f} | lr {lr:.2e} | gnorm "
                          f"{gnorm.item():.2f} | {1e3 * dt / n_acc:.1f} ms | {tok_s:,.0f} tok/s",
                          flush=True)
            loss_acc, n_acc, t_log = 0.0, 0, time.time()
        if bar is not None:
            bar.update(1)
        is_eval = t.eval_interval > 0 and done % t.eval_interval == 0 and done < steps
        if is_eval:
            val_loss = run_eval(t.eval_tokens, done)
            best_val = min(best_val, val_loss)
            if master:
                log({"step": done, "split": "val", "loss": val_loss, "ppl": math.exp(val_loss),
                     "tokens": done * tokens_per_step})
                msg = (f"step {done:>6}/{steps} | val loss {val_loss:.4f} | "
                       f"ppl {math.exp(val_loss):.2f}")
                (bar.write if bar is not None else print)(msg)
        if (t.ckpt_interval and done % t.ckpt_interval == 0) or (not t.ckpt_interval and is_eval):
            save(done)
    if bar is not None:
        bar.close()
    wall = time.time() - t0

    # --- the end: full validation, final checkpoint, summary, plot ---
    final_val = run_eval(None, steps)
    best_val = min(best_val, final_val)
    if master:
        log({"step": steps, "split": "val", "loss": final_val, "ppl": math.exp(final_val),
             "tokens": steps * tokens_per_step})
        metrics.close()
    save(steps)
    summary = Summary(
        out_dir=str(out), steps=steps, tokens=steps * tokens_per_step,
        train_flops=plan.train_flops, flops_per_token=fpt, param_groups=groups,
        final_val_loss=final_val, final_val_ppl=math.exp(final_val), best_val_loss=best_val,
        final_train_loss=train_loss, wall_time_s=wall, sgt=asdict(plan),
        tokens_per_s=(steps - start) * tokens_per_step / max(wall, 1e-9), device=str(device),
        dtype=str(amp or "fp32").replace("torch.", ""), torch_version=torch.__version__,
        world_size=world, config=to_dict(cfg),
    )
    if master:
        (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
        plot_losses(out / "metrics.jsonl", out / "loss.png", 3 * fpt)
        if writer is not None:
            writer.close()
    if ddp:
        dist.barrier()
    return summary


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "--train.tensorboard needs TensorBoard: pip install 'structlm[tensorboard]'"
        ) from None
    return SummaryWriter(str(out / "tb"))


def plot_losses(metrics_path: Path, png: Path, train_flops_per_token: float) -> None:
    """loss.png: train and validation loss against tokens (training FLOPs on the top axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["tokens"], r["loss"]) for r in rows if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=split, ms=4)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    top = ax.secondary_xaxis(
        "top", functions=(lambda x: x * train_flops_per_token, lambda f: f / train_flops_per_token)
    )
    top.set_xlabel("training FLOPs")
    ax.set_title(str(png.parent.name), fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
