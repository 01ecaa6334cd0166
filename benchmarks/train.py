"""Training throughput and MFU per dtype: the tiny preset over a few steps, one step of larger presets,
and optionally a shape of your own.

    python benchmarks/train.py [--presets small,base] [--dtypes auto,float32,bfloat16] [--shape 384x8x6 --vocab 8192]

Data: the standard library's json and email packages, built with midfill's own pipeline and a BPE
of --vocab tokens (the real model's 49,216-token vocabulary would make the output layer larger).
Tokens/s and MFU are the trainer's own metrics rows (the first step, which warms up, left out);
MFU is of the data-sheet bf16 peak on a GPU and of the measured matmul peak on a CPU, with the
FLOPs per token of midfill.train.hardware.flops_per_token. An "auto" row shows what the start-up
survey picked; the rates it picked by are printed under the table.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
from pathlib import Path

import torch

from midfill.data.build import BuildConfig, build_dataset
from midfill.tokenizer import train_tokenizer
from midfill.train.config import PRESETS, TrainConfig
from midfill.train.run_folder import RunFolder
from midfill.train.trainer import train


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(data: Path, folder: Path, preset: str, shape: dict[str, int], steps: int, block: int, micro_batch: int,
        dtype: str) -> tuple[float, float | None, int, dict]:  # fmt: skip
    """Mean tokens/s and MFU after the first step, the parameter count, and the run's hardware survey."""
    config = TrainConfig(data=str(data), out_dir=str(folder), preset=preset, model=shape, steps=steps, micro_batch=micro_batch,
                         block_size=block, warmup_steps=1, eval_every=0, checkpoint_every=10**9, dtype=dtype)  # fmt: skip
    train(config, show_progress=False)
    run_folder = RunFolder(folder)
    rows = run_folder.rows()
    timed = rows[1:] or rows  # the first step warms up
    mfu = mean([r["mfu"] for r in timed]) if "mfu" in timed[0] else None
    n_params = sum(p.numel() for p in torch.load(run_folder.checkpoint, weights_only=False)["model"].values())
    return mean([r["tokens_per_s"] for r in timed]), mfu, n_params, json.loads(run_folder.hardware.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,base", help="larger presets to time for one step (after warm-up)")
    parser.add_argument("--dtypes", default="auto,float32,bfloat16", help="autocast dtypes to time; auto: the trainer's pick")
    parser.add_argument("--shape", default="", help="n_embd x n_layer x n_head of one more model to time, e.g. 384x8x6")
    parser.add_argument("--block", type=int, default=512, help="block size for the larger presets and --shape")
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer size (the model pads it to a multiple of 64)")
    parser.add_argument("--steps", type=int, default=3, help="steps of the larger presets and --shape, the first untimed")
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    plans = [("tiny", {}, 20, 256, 8)]
    plans += [(p, {}, args.steps, min(args.block, PRESETS[p]["n_positions"]), 2) for p in args.presets.split(",") if p]
    if args.shape:
        n_embd, n_layer, n_head = map(int, args.shape.split("x"))
        plans.append(("tiny", dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=args.block), args.steps, args.block, 2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:100]]
        train_tokenizer(texts, args.vocab).save(folder / "tok.json")
        build_dataset([str(stdlib / "json"), str(stdlib / "email")], folder / "data", folder / "tok.json",
                      BuildConfig(workers=2, val_fraction=0.0))
        print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
              f"torch threads {torch.get_num_threads()}\n")
        print("| model | parameters | block | batch | dtype | steps timed | tokens/s | MFU | of peak |")
        print("|---|---|---|---|---|---|---|---|---|")
        notes = []
        for i, (preset, shape, steps, block, batch) in enumerate(plans):
            name = "x".join(str(shape[k]) for k in ("n_embd", "n_layer", "n_head")) if shape else preset
            for dtype in args.dtypes.split(","):
                rate, mfu, n_params, survey = run(folder / "data", folder / f"{i}-{dtype}", preset, shape, steps, block, batch, dtype)
                shown = f"auto: {survey['dtype']}" if dtype == "auto" else dtype
                peak = f"{survey['peak_flops'] / 1e9:,.0f} GFLOP/s ({survey['peak_from']})" if survey["peak_flops"] else "unknown"
                print(f"| {name} | {n_params / 1e6:.1f}M | {block} | {batch} | {shown} | {steps - 1} | {rate:,.0f} | "
                      f"{'–' if mfu is None else f'{mfu:.1%}'} | {peak} |")
                if dtype == "auto":
                    notes.append(f"{name}: auto picked {survey['dtype']} ({survey['chosen_by']}"
                                 + "".join(f", {d} {r:,.0f}" for d, r in survey["tokens_per_s"].items())
                                 + (" tok/s fwd+bwd" if survey["tokens_per_s"] else "") + ")")
        if notes:
            print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
