"""Training throughput: tokens/s of the tiny preset over a few steps, and one step of larger presets.

    python benchmarks/train.py [--presets small,base] [--dtype bfloat16]

Data: the standard library's json and email packages, built with midfill's own pipeline and a
4,096-token BPE (the real model's 49,216-token vocabulary would make the output layer larger).
On a GPU it also prints MFU: achieved FLOP/s over the card's peak, counting 6 * parameters +
12 * layers * block * n_embd FLOP per token (the usual estimate with attention).
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
from pathlib import Path

import torch

from midfill.data.build import BuildConfig, build_dataset
from midfill.tokenizer import train_tokenizer
from midfill.train.config import PRESETS, TrainConfig
from midfill.train.run_folder import RunFolder
from midfill.train.trainer import train

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def run(data: Path, folder: Path, preset: str, steps: int, block: int, micro_batch: int, dtype: str) -> tuple[float, int]:
    config = TrainConfig(data=str(data), out_dir=str(folder / preset), preset=preset, steps=steps, micro_batch=micro_batch,
                         block_size=block, warmup_steps=1, eval_every=0, checkpoint_every=10**9, dtype=dtype)
    train(config, show_progress=False)
    run_folder = RunFolder(folder / preset)
    rows = [r for r in run_folder.rows() if "tokens_per_s" in r]
    rates = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]  # the first step warms up
    n_params = sum(p.numel() for p in torch.load(run_folder.checkpoint, weights_only=False)["model"].values())
    return sum(rates) / len(rates), n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,base", help="larger presets to time for one step (after warm-up)")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:100]]
        train_tokenizer(texts, 4096).save(folder / "tok.json")
        build_dataset([str(stdlib / "json"), str(stdlib / "email")], folder / "data", folder / "tok.json",
                      BuildConfig(workers=2, val_fraction=0.0))
        peak = peak_flops()
        print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, dtype {args.dtype}, "
              f"torch threads {torch.get_num_threads()}\n")
        print("| preset | parameters | block | batch | steps timed | tokens/s |" + (" MFU |" if peak else ""))
        print("|---|---|---|---|---|---|" + ("---|" if peak else ""))
        plans = [("tiny", 20, 256, 8)] + [(p, 2, min(512, PRESETS[p]["n_positions"]), 2) for p in args.presets.split(",") if p]
        for preset, steps, block, batch in plans:
            rate, n_params = run(folder / "data", folder, preset, steps, block, batch, args.dtype)
            shape = PRESETS[preset]
            row = f"| {preset} | {n_params / 1e6:.1f}M | {block} | {batch} | {steps - 1} | {rate:,.0f} |"
            if peak:
                flops_per_token = 6 * n_params + 12 * shape["n_layer"] * block * shape["n_embd"]
                row += f" {rate * flops_per_token / peak:.1%} |"
            print(row)


if __name__ == "__main__":
    main()
