"""The web page (playground, chat, status) and the JSON it reads for status.

The page's files ship inside the package and use no CDN, so it works offline; they are public,
like /health, and the page asks for the API key when the server wants one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from midfill.server.state import ServerState, get_state
from midfill.train.run_folder import RunFolder

STATIC = Path(__file__).with_name("static")
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html")


def finetune_status(run: Path) -> dict | None:
    """progress.json and the loss curve of a `midfill finetune` run folder, or None when there is none yet."""
    folder = RunFolder(run)
    progress = folder.read_progress()
    if progress is None:
        return None
    train, test = folder.curve()
    return {**progress, "run": str(run), "curve": {"train": train[-500:], "test": test}}


@router.get("/v1/status")
async def status(state: ServerState = Depends(get_state)):
    engine, net = state.engine, state.engine.model
    return {
        "model": state.settings.model_name,
        "parameters": net.num_parameters(),
        "weights": net.weight_format or str(net.dtype).removeprefix("torch."),
        "dtype": str(net.dtype).removeprefix("torch."),
        "path": state.path,
        "device": str(net.device),
        "context": state.ctx,
        "queue_depth": engine.queue_depth,
        "active": len(engine.active),
        **state.metrics.summary(),
        "finetune": finetune_status(Path(state.settings.finetune_run)) if state.settings.finetune_run else None,
    }
