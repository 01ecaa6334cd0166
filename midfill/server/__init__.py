"""The HTTP server: OpenAI, Refact and llama.cpp protocols over one engine."""
