"""The `midfill` command: thin wrappers that turn options into calls to the packages below."""

from midfill.cli import evaluation, finetuning, inference, training  # noqa: F401  (their commands register on the app)
from midfill.cli.common import app

__all__ = ["app"]
