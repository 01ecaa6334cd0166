"""Deduplication: exact copies by a hash of whitespace-normalized content, near copies by MinHash LSH.

Near-duplicate settings follow StarCoder: word 5-gram shingles, 256 permutations, Jaccard
threshold 0.7; the first document of a cluster is kept. The LSH index lives in memory; for a
corpus that outgrows one machine, pass `redis=("host", port)` and datasketch keeps the index in
Redis (its `storage_config`), shared by every machine that builds.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from datasketch import LeanMinHash, MinHash, MinHashLSH

NUM_PERM = 256
SHINGLE = 5
THRESHOLD = 0.7
TOKEN = re.compile(r"\w+")


def exact_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def minhash_signature(text: str, num_perm: int = NUM_PERM, shingle: int = SHINGLE) -> LeanMinHash:
    """MinHash of the document's word n-grams (computed in worker processes, small to send back)."""
    words = TOKEN.findall(text)
    grams = {" ".join(words[i : i + shingle]).encode("utf-8") for i in range(max(len(words) - shingle + 1, 1))}
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch(list(grams))
    return LeanMinHash(m)


@dataclass
class Deduplicator:
    """Decides, document by document, whether each is new; remembers the ones it kept."""

    threshold: float = THRESHOLD
    num_perm: int = NUM_PERM
    redis: tuple[str, int] | None = None
    seen: set[str] = field(default_factory=set)
    exact_duplicates: int = 0
    near_duplicates: int = 0

    def __post_init__(self) -> None:
        storage = {"type": "dict"}
        if self.redis is not None:
            host, port = self.redis
            storage = {"type": "redis", "redis": {"host": host, "port": port}, "basename": b"midfill-lsh"}
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, storage_config=storage)
        self._count = 0

    def keep(self, text: str, minhash: LeanMinHash) -> bool:
        key = exact_key(text)
        if key in self.seen:
            self.exact_duplicates += 1
            return False
        if self.lsh.query(minhash):
            self.near_duplicates += 1
            return False
        self.seen.add(key)
        self.lsh.insert(str(self._count), minhash)
        self._count += 1
        return True
