"""A training run's folder: the one place its file names are spelled, for the trainer that writes
them and for the status page, the recipe and the model card that read them."""

from __future__ import annotations

import json
from pathlib import Path

from midfill.files import write_text_atomic


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"  # a row per step: loss, lr, ... and val_loss when measured
        self.progress = self.path / "progress.json"  # where the run stands, for the status page
        self.hardware = self.path / "hardware.json"  # the dtype chosen at start-up and why, and the peak MFU is of
        self.checkpoint = self.path / "checkpoint.pt"  # everything a resumed run needs
        self.checkpoints = self.path / "checkpoints"  # a finetune's adapter at each evaluation
        self.model = self.path / "model"  # the trained model, a folder midfill loads
        self.adapter = self.path / "adapter"  # a finetune's best adapter
        self.loss_plot, self.test_loss_plot = self.path / "loss.png", self.path / "test_loss.png"
        self.files, self.report, self.report_md = self.path / "files.json", self.path / "report.json", self.path / "REPORT.md"

    def checkpoint_dir(self, step: int, loss: float) -> Path:
        return self.checkpoints / f"step-{step:06d}-loss-{loss:.4f}"

    def rows(self) -> list[dict]:
        """The metrics rows written so far (up to a line being written right now)."""
        rows = []
        try:
            for line in self.metrics.read_text().splitlines():
                rows.append(json.loads(line))
        except (OSError, json.JSONDecodeError):
            pass
        return rows

    def curve(self) -> tuple[list[list[float]], list[list[float]]]:
        """([step, training loss], ...) and ([step, held-out loss], ...)."""
        rows = self.rows()
        train = [[r["step"], r["loss"]] for r in rows if "loss" in r]
        return train, [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r]

    def log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def trim(self, step: int) -> None:
        """Drop rows from beyond `step`, so a resumed run's log reads as one run."""
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in self.rows() if r["step"] <= step))

    def write_progress(self, **fields) -> None:
        write_text_atomic(self.progress, json.dumps(fields) + "\n")

    def read_progress(self) -> dict | None:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, json.JSONDecodeError):
            return None
