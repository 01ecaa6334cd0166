"""Generation: KV-cached decoding, sampling, stop rules and streaming text."""

from midfill.engine.assembler import TextAssembler
from midfill.engine.decode import generate, stream_text
from midfill.engine.sampling import Sampler, SamplingParams
from midfill.engine.stops import StopRules
from midfill.prompts import cursor_indent

__all__ = ["Sampler", "SamplingParams", "StopRules", "TextAssembler", "cursor_indent", "generate", "stream_text"]
