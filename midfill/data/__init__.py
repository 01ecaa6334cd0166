"""Training data: sources, filters, dedup, packing into token shards, and FIM transforms."""
