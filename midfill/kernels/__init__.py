"""Native CPU kernels for decoding (decode.c), built on first use; see native.py."""
