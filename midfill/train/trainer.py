"""The training loop, for pretraining and the repository finetune alike: Lion (or AdamW), warmup +
cosine, gradient accumulation and clipping, autocast to the dtype this machine trains fastest in,
torch.compile on a GPU, early dropout, held-out loss, early stopping, atomic checkpoints and exact
resume, DDP or FSDP, and MFU in every metrics row. What differs between runs is the model (new, or
a base with a LoRA wrap) and where its batches come from.

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
from collections.abc import Callable, Iterator
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
from midfill.tokenizer import Tokenizer, load_tokenizer
from midfill.train.checkpoint import FULL, read_checkpoint, restore, save_checkpoint
from midfill.train.config import LoopConfig, TrainConfig
from midfill.train.hardware import autocast, survey
from midfill.train.plot import plot_losses
from midfill.train.run_folder import RunFolder
from midfill.train.schedule import early_dropout, learning_rate

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, loss mask [B, T]
Report = Callable[[int, int, dict], None]  # (step, total steps, that step's metrics row)
EVAL_SEED_OFFSET = 1_000_003  # eval batches come from their own seeds, never from a training step's
LOOP_STATE = ("step", "best_val_loss", "best_step", "last_val_loss", "bad_evals")  # how far a run has come, checkpointed


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (a collective: every process calls it)."""
        if self.world == 1:
            return values
        total = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(values, (total / self.world).tolist()))


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


def make_optimizer(model: torch.nn.Module, config: LoopConfig) -> torch.optim.Optimizer:
    trained = [p for p in model.parameters() if p.requires_grad]  # under a LoRA wrap: the adapter
    decay, no_decay = [p for p in trained if p.dim() >= 2], [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    from lion_pytorch import Lion  # imported here: only training needs it

    return Lion(groups, lr=config.lr, betas=config.betas)


def compile_blocks(model: GPTRefactForCausalLM) -> None:
    """torch.compile each block's attention and MLP in place, so parameter names (and checkpoints)
    stay as they are. The residual adds stay eager with their dropout: its p follows the early
    dropout schedule, a new float every step, on which a compiled graph would guard and recompile."""
    for block in model.transformer.h:
        block.attn.compile()
        block.mlp.compile()


def wrap(model: GPTRefactForCausalLM, config: LoopConfig, cluster: Cluster) -> torch.nn.Module:
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


class PackedData:
    """Batches from the token shards of `midfill data build`: random windows, FIM applied per document.

    A run's data is any object like this one: `batch(step, samples)` and `held_out(index, samples)`
    are pure functions of their arguments (samples: indices within the global batch), so resumed
    and distributed runs see the same batches; `eval_batches` held-out ones make an evaluation."""

    def __init__(self, config: TrainConfig) -> None:
        manifest = read_manifest(config.data)
        self.config = config
        self.tok = load_tokenizer(Path(config.data) / manifest["tokenizer"])
        self.train = TokenShards(config.data, "train")
        self.val = TokenShards(config.data, "val") if any(s["tokens"] for s in manifest["splits"]["val"]) else None
        self.eval_batches = config.eval_batches if self.val is not None else 0

    def batch(self, step: int, samples: range) -> Batch:
        c = self.config
        return make_batch(self.train, self.tok, c.seed, step, samples, c.block_size, c.fim)

    def held_out(self, index: int, samples: range) -> Batch:
        c = self.config
        return make_batch(self.val, self.tok, c.seed + EVAL_SEED_OFFSET, index, samples, c.block_size, c.fim)


def new_model(config: TrainConfig, tok: Tokenizer) -> GPTRefactForCausalLM:
    """The network of the config's shape, initialised, or started from `init_from`'s weights."""
    torch.manual_seed(config.seed)
    model = GPTRefactForCausalLM(RefactConfig(vocab_size=padded_vocab(tok.vocab_size), torch_dtype="float32", **config.shape()))
    init_weights(model)
    if config.init_from:
        base = load_model(config.init_from, dtype="float32")
        keys = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "mlp_hidden")
        theirs, ours = ({k: getattr(c, k) for k in keys} for c in (base.config, model.config))
        if theirs != ours:
            raise MidfillError(f"init_from {config.init_from}: its shape {theirs} differs from this run's {ours}")
        model.load_state_dict(base.state_dict())
    return model


class Run:
    """One run of the training loop: the model (wrapped for DDP/FSDP), its data (see PackedData),
    optimizer and schedule, its folder, its hardware survey (dtype, MFU's peak) and how far it has
    come. `settings` are what a resumed run must match; `on_eval(step, held-out loss)` is called
    after each evaluation, on every process."""

    def __init__(self, model: GPTRefactForCausalLM, data, folder: RunFolder, config: LoopConfig, settings, cluster: Cluster,
                 on_eval: Callable[[int, float], None] | None = None) -> None:  # fmt: skip
        self.model, self.data, self.folder, self.config, self.settings = model, data, folder, config, settings
        self.cluster, self.on_eval = cluster, on_eval
        if config.attention == "flex" and cluster.device.type != "cuda":
            raise MidfillError("attention = 'flex' trains only on a GPU: torch's FlexAttention has no backward pass on a CPU")
        resumed = read_checkpoint(folder.checkpoint, settings)
        compiled = config.compile if config.compile != "auto" else cluster.device.type == "cuda"
        self.hardware = survey(model, config.dtype, compiled, config.micro_batch, config.block_size,
                               kept=resumed.get("dtype") if resumed else None, agree=cluster.mean)  # fmt: skip
        model.attention = config.attention
        if compiled:
            compile_blocks(model)
        self.wrapped = wrap(model, config, cluster)
        self.optimizer = make_optimizer(self.wrapped, config)
        self.step, self.best_val_loss, self.best_step, self.last_val_loss, self.bad_evals = 0, math.inf, None, None, 0
        if resumed is not None:
            restore(resumed, self.wrapped, self.optimizer)
            for key in LOOP_STATE:  # checkpoints from before early stopping lack some: they keep their start values
                setattr(self, key, resumed.get(key, getattr(self, key)))
        if cluster.main:
            folder.path.mkdir(parents=True, exist_ok=True)
            folder.trim(self.step if resumed is not None else -1)  # a fresh run starts a fresh log
            write_text_atomic(folder.hardware, json.dumps(self.hardware.to_dict(), indent=2) + "\n")

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.micro_batch * c.grad_accum * self.cluster.world * c.block_size

    @property
    def stopped_early(self) -> bool:
        return self.config.patience > 0 and self.bad_evals >= self.config.patience

    @property
    def total(self) -> int:
        return self.step if self.stopped_early else self.config.steps

    def micro_batches(self, step: int, make: Callable[[int, range], Batch]) -> list[tuple[int, Batch]]:
        """This process's micro-batches of a step, with their group numbers: group m * world + rank
        holds samples group * micro_batch ... (group + 1) * micro_batch - 1 of the global batch."""
        c, n = self.config, self.config.micro_batch
        out = []
        for micro in range(c.grad_accum):
            group = micro * self.cluster.world + self.cluster.rank
            batch = make(step, range(group * n, (group + 1) * n))
            out.append((group, tuple(t.to(self.cluster.device) for t in batch)))
        return out

    def train_step(self) -> float:
        c, step = self.config, self.step
        lr = learning_rate(c, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.dropout = early_dropout(c, step)
        self.wrapped.train()
        batches = self.micro_batches(step, self.data.batch)
        total = torch.zeros((), device=self.cluster.device)
        for index, (group, (x, y, mask)) in enumerate(batches):
            torch.manual_seed(sample_seed(c.seed, step, -1 - group))  # dropout masks follow the samples
            last = index == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.cluster.world == 1 or c.parallel == "fsdp" else self.wrapped.no_sync()
            with sync, autocast(self.hardware.dtype, self.cluster.device):
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
        if self.data.eval_batches == 0:
            return None
        self.wrapped.eval()
        total = torch.zeros((), device=self.cluster.device)
        for i in range(self.data.eval_batches):
            for _, (x, y, mask) in self.micro_batches(i, self.data.held_out):
                with autocast(self.hardware.dtype, self.cluster.device):
                    total += masked_loss(self.wrapped(x), y, mask)
        if self.cluster.world > 1:
            dist.all_reduce(total)
        return total.item() / (self.data.eval_batches * self.config.grad_accum * self.cluster.world)

    def evaluate(self) -> float | None:
        """The held-out loss now, kept as the best (or counted against the patience)."""
        val = self.eval_loss()
        if val is not None:
            self.last_val_loss = val
            if val < self.best_val_loss:
                self.best_val_loss, self.best_step, self.bad_evals = val, self.step, 0
            else:
                self.bad_evals += 1
            if self.on_eval is not None:
                self.on_eval(self.step, val)
        return val

    def fit(self, until_step: int | None = None, report: Report | None = None) -> bool:
        """Train to the end of the schedule or an early stop (True), or pause after `until_step`
        (False); either way checkpointed. Each step is a metrics row and a progress update."""
        c = self.config
        last = min(c.steps, until_step or c.steps)
        started, first = time.perf_counter(), self.step
        while self.step < last and not self.stopped_early:
            began = time.perf_counter()
            loss = self.train_step()
            rate = self.tokens_per_step / (time.perf_counter() - began)
            row = {"step": self.step + 1, "loss": loss, "lr": learning_rate(c, self.step), "dropout": early_dropout(c, self.step),
                   "tokens_per_s": rate}  # fmt: skip
            mfu = self.hardware.mfu(rate / self.cluster.world)
            if mfu is not None:
                row["mfu"] = mfu
            self.step += 1
            if c.eval_every and (self.step % c.eval_every == 0 or self.step == c.steps):
                val = self.evaluate()
                if val is not None:
                    row["val_loss"] = val
            if self.cluster.main:
                self.folder.log(row)
                eta = (time.perf_counter() - started) / (self.step - first) * (self.total - self.step)
                self.folder.write_progress(state="running", step=self.step, total=self.total, loss=loss, lr=row["lr"],
                                           test_loss=self.last_val_loss, eta_s=eta, dtype=self.hardware.dtype, mfu=mfu)  # fmt: skip
            if report is not None:
                report(self.step, self.total, row)
            if self.step % c.checkpoint_every == 0 or self.step == last or self.stopped_early:
                self.checkpoint()
        return self.step >= c.steps or self.stopped_early

    def checkpoint(self) -> None:
        c = self.config
        extra = {**{key: getattr(self, key) for key in LOOP_STATE}, "config": self.settings.to_dict(), "dtype": self.hardware.dtype,
                 "data_position": {"step": self.step, "samples_seen": self.step * self.tokens_per_step // c.block_size},
                 "schedule": {"lr": learning_rate(c, self.step), "dropout": early_dropout(c, self.step)}}  # fmt: skip
        save_checkpoint(self.folder.checkpoint, self.wrapped, self.optimizer, extra, write=self.cluster.main)

    def export(self, tok: Tokenizer) -> Path:
        """The HF-format folder (config.json, model.safetensors, tokenizer.json) that midfill loads."""
        state = get_model_state_dict(self.wrapped, options=FULL)  # gathers the shards under FSDP
        if self.cluster.main:
            model = GPTRefactForCausalLM(self.model.config)
            model.load_state_dict(state)
            save_model(model, self.folder.model)
            tok.save(self.folder.model / "tokenizer.json")
            plot_losses(self.folder.curve(), self.folder.loss_plot, title=f"{self.folder.path.name}: loss")
        return self.folder.model


@contextlib.contextmanager
def progress_bar(description: str, disable: bool = False, console=None, header: str = "") -> Iterator[Report]:
    """A progress bar on the terminal, under a `header` line, and the `Report` that moves it."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, disable=disable, console=console) as bar:
        if header and not disable:
            bar.console.print(header)
        task = bar.add_task(description, total=None, stats="")

        def report(step: int, total: int, row: dict) -> None:
            mfu = f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""
            held_out = f"  held-out {row['val_loss']:.3f}" if "val_loss" in row else ""
            bar.update(task, completed=step, total=total, stats=f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s{mfu}{held_out}")

        yield report


def train(config: TrainConfig, until_step: int | None = None, show_progress: bool = True) -> Path:
    """Train (or resume) a run; stop after `until_step` steps if given (checkpointed, resumable)."""
    cluster = join_cluster()
    data = PackedData(config)
    run = Run(new_model(config, data.tok).to(cluster.device), data, RunFolder(config.out_dir), config, config, cluster)
    with progress_bar("training", disable=not (show_progress and cluster.main), header=run.hardware.summary()) as report:
        finished = run.fit(until_step, report)
    folder = run.export(data.tok)
    if finished and cluster.main:
        run.folder.write_progress(state="done", step=run.step, total=run.step, test_loss=run.last_val_loss, eta_s=0,
                                  dtype=run.hardware.dtype)  # fmt: skip
    if cluster.world > 1:
        dist.barrier()
    return folder
