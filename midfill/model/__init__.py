"""The Refact network, its configuration, KV cache and checkpoint loading."""

from midfill.model.config import RefactConfig
from midfill.model.kv_cache import KVCache
from midfill.model.refact import GPTRefactForCausalLM

__all__ = ["GPTRefactForCausalLM", "KVCache", "RefactConfig"]
