"""midfill: self-hosted fill-in-the-middle code completion and chat with Refact-1.6B-architecture models.

The stable public API: load a model and tokenizer, build prompts, generate.
"""

from midfill.engine import SamplingParams, StopRules, TextAssembler, generate, stream_text
from midfill.errors import MidfillError
from midfill.model import GPTRefactForCausalLM, KVCache, RefactConfig
from midfill.model.checkpoint import load_model, save_model
from midfill.prompts import ChatMessage, chat_prompt, fim_prompt, fim_prompt_psm, fim_prompt_spm
from midfill.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ChatMessage",
    "GPTRefactForCausalLM",
    "KVCache",
    "MidfillError",
    "RefactConfig",
    "SamplingParams",
    "StopRules",
    "TextAssembler",
    "Tokenizer",
    "chat_prompt",
    "fim_prompt",
    "fim_prompt_psm",
    "fim_prompt_spm",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
    "stream_text",
]
