"""The training loop: Lion (or AdamW), warmup + cosine, gradient accumulation and clipping, bf16
autocast, early dropout, held-out loss, atomic checkpoints and exact resume, DDP or FSDP.

Run it in one process, or under `torchrun --nproc_per_node N` (gloo on CPU, nccl on GPU). Every
batch is a function of (seed, step, sample index) and the global batch is cut the same way for
any number of processes, so a resumed or distributed run sees the samples a single uninterrupted
run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from midfill.data.batches import make_batch, sample_seed
from midfill.data.packing import TokenShards, read_manifest
from midfill.errors import MidfillError
from midfill.files import write_text_atomic
from midfill.model import GPTRefactForCausalLM, RefactConfig
from midfill.model.checkpoint import load_model, save_model
from midfill.tokenizer import load_tokenizer
from midfill.train.checkpoint import FULL, load_checkpoint, save_checkpoint
from midfill.train.config import TrainConfig
from midfill.train.plot import plot_losses
from midfill.train.schedule import early_dropout, learning_rate

METRICS = "metrics.jsonl"
EVAL_SEED_OFFSET = 1_000_003  # eval batches come from their own seeds, never from a training step's


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_cluster() -> Cluster:
    """This process's place among torchrun's processes (or a cluster of one)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Cluster(device=torch.device("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Cluster(dist.get_rank(), dist.get_world_size(), device)


def padded_vocab(size: int, multiple: int = 64) -> int:
    return multiple * math.ceil(size / multiple)


def init_weights(model: GPTRefactForCausalLM) -> None:
    """GPT-2 style: N(0, 0.02), output projections scaled down by sqrt(2 * n_layer)."""
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            torch.nn.init.ones_(p)
        elif name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * model.config.n_layer))
        else:
            torch.nn.init.normal_(p, 0.0, std)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    from lion_pytorch import Lion  # imported here: only training needs it

    return Lion(groups, lr=config.lr, betas=config.betas)


def wrap(model: GPTRefactForCausalLM, config: TrainConfig, cluster: Cluster) -> torch.nn.Module:
    if cluster.world == 1:
        return model
    if config.parallel == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise MidfillError("parallel = 'fsdp' needs torch >= 2.6 (FSDP2's fully_shard)") from None

        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)
    device_ids = [cluster.device.index] if cluster.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def autocast(config: TrainConfig, device: torch.device):
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


class Run:
    """One training run: the model, its data and optimizer, and what has been logged so far."""

    def __init__(self, config: TrainConfig, cluster: Cluster) -> None:
        self.config, self.cluster = config, cluster
        self.out = Path(config.out_dir)
        manifest = read_manifest(config.data)
        self.tok = load_tokenizer(Path(config.data) / manifest["tokenizer"])
        self.train_tokens = TokenShards(config.data, "train")
        self.val_tokens = TokenShards(config.data, "val") if any(s["tokens"] for s in manifest["splits"]["val"]) else None
        model_config = RefactConfig(vocab_size=padded_vocab(self.tok.vocab_size), torch_dtype="float32", **config.shape())
        torch.manual_seed(config.seed)
        self.model = GPTRefactForCausalLM(model_config)
        init_weights(self.model)
        if config.init_from:
            self.start_from(config.init_from)
        self.model.to(cluster.device)
        self.wrapped = wrap(self.model, config, cluster)
        self.optimizer = make_optimizer(self.wrapped, config)
        self.step = 0
        self.best_val = float("inf")
        resumed = load_checkpoint(self.out, self.wrapped, self.optimizer)
        if resumed is not None:
            if TrainConfig.from_dict(resumed["config"]).to_dict() != config.to_dict():  # settings added later take defaults
                raise MidfillError(f"{self.out}: holds a run with different settings; use another out_dir or the same config")
            self.step, self.best_val = resumed["step"], resumed["best_val_loss"]
        if cluster.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.trim_metrics()

    def start_from(self, folder: str) -> None:
        base = load_model(folder)
        keys = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "mlp_hidden")
        theirs, ours = ({k: getattr(c, k) for k in keys} for c in (base.config, self.model.config))
        if theirs != ours:
            raise MidfillError(f"init_from {folder}: its shape {theirs} differs from this run's {ours}")
        self.model.load_state_dict(base.state_dict())

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.micro_batch * c.grad_accum * self.cluster.world * c.block_size

    def trim_metrics(self) -> None:
        """Drop log lines from beyond the checkpoint, so a resumed run's log reads as one run."""
        path = self.out / METRICS
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < self.step]
            write_text_atomic(path, "".join(line + "\n" for line in lines))

    def log(self, row: dict) -> None:
        if self.cluster.main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    def micro_batches(self, step: int, seed: int, tokens: TokenShards) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
        """This process's micro-batches of a step, with their group numbers: group m * world + rank
        holds samples group * micro_batch ... (group + 1) * micro_batch - 1 of the global batch."""
        c, n = self.config, self.config.micro_batch
        out = []
        for micro in range(c.grad_accum):
            group = micro * self.cluster.world + self.cluster.rank
            batch = make_batch(tokens, self.tok, seed, step, range(group * n, (group + 1) * n), c.block_size, c.fim)
            out.append((group, tuple(t.to(self.cluster.device) for t in batch)))
        return out

    def train_step(self) -> float:
        c, step = self.config, self.step
        lr = learning_rate(c, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.dropout = early_dropout(c, step)
        self.wrapped.train()
        batches = self.micro_batches(step, c.seed, self.train_tokens)
        total = torch.zeros((), device=self.cluster.device)
        for index, (group, (x, y, mask)) in enumerate(batches):
            torch.manual_seed(sample_seed(c.seed, step, -1 - group))  # dropout masks follow the samples
            last = index == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.cluster.world == 1 or c.parallel == "fsdp" else self.wrapped.no_sync()
            with sync, autocast(c, self.cluster.device):
                loss = masked_loss(self.wrapped(x), y, mask) / len(batches)
            loss.backward()
            total += loss.detach()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cluster.world > 1:
            dist.all_reduce(total)
            total /= self.cluster.world
        return total.item()

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        if self.val_tokens is None or self.config.eval_batches == 0:
            return None
        self.wrapped.eval()
        total = torch.zeros((), device=self.cluster.device)
        for i in range(self.config.eval_batches):
            for _, (x, y, mask) in self.micro_batches(i, self.config.seed + EVAL_SEED_OFFSET, self.val_tokens):
                with autocast(self.config, self.cluster.device):
                    total += masked_loss(self.wrapped(x), y, mask)
        if self.cluster.world > 1:
            dist.all_reduce(total)
        return total.item() / (self.config.eval_batches * self.config.grad_accum * self.cluster.world)

    def checkpoint(self) -> None:
        extra = {"step": self.step, "best_val_loss": self.best_val, "config": self.config.to_dict(),
                 "data_position": {"step": self.step, "samples_seen": self.step * self.tokens_per_step // self.config.block_size},
                 "schedule": {"lr": learning_rate(self.config, self.step), "dropout": early_dropout(self.config, self.step)}}
        save_checkpoint(self.out, self.wrapped, self.optimizer, extra, write=self.cluster.main)

    def export(self) -> Path:
        """The HF-format folder (config.json, model.safetensors, tokenizer.json) that midfill loads."""
        folder = self.out / "model"
        state = get_model_state_dict(self.wrapped, options=FULL)  # gathers the shards under FSDP
        if self.cluster.main:
            model = GPTRefactForCausalLM(self.model.config)
            model.load_state_dict(state)
            save_model(model, folder)
            self.tok.save(folder / "tokenizer.json")
            plot_losses(self.out / METRICS, self.out / "loss.png", title=f"{self.out.name}: loss")
        return folder


def train(
    config: TrainConfig,
    until_step: int | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train (or resume) a run; stop after `until_step` steps if given (checkpointed, resumable)."""
    cluster = join_cluster()
    run = Run(config, cluster)
    last = min(config.steps, until_step or config.steps)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not (show_progress and cluster.main)) as progress:
        task = progress.add_task("training", total=config.steps, completed=run.step, stats="")
        while run.step < last:
            started = time.perf_counter()
            loss = run.train_step()
            seconds = time.perf_counter() - started
            row = {"step": run.step, "loss": loss, "lr": learning_rate(config, run.step),
                   "dropout": early_dropout(config, run.step), "tokens_per_s": run.tokens_per_step / seconds}
            run.step += 1
            if config.eval_every and (run.step % config.eval_every == 0 or run.step == config.steps):
                val = run.eval_loss()
                if val is not None:
                    row["val_loss"] = val
                    run.best_val = min(run.best_val, val)
            run.log(row)
            progress.update(task, completed=run.step, stats=f"loss {loss:.3f}  {row['tokens_per_s']:,.0f} tok/s")
            if on_step is not None:
                on_step(run.step, loss)
            if run.step % config.checkpoint_every == 0 or run.step == last:
                run.checkpoint()
    folder = run.export()
    if cluster.world > 1:
        dist.barrier()
    return folder
