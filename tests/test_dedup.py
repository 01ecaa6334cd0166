"""Exact and near-duplicate removal: near copies go, distinct files stay."""

from midfill.data.dedup import Deduplicator, minhash_signature

ORIGINAL = '''def merge_sorted(left, right):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result


def merge_sort(items):
    """Sort a list with merge sort: split, sort each half, merge."""
    if len(items) <= 1:
        return items
    middle = len(items) // 2
    return merge_sorted(merge_sort(items[:middle]), merge_sort(items[middle:]))


def binary_search(items, target):
    """Index of target in the sorted list items, or -1 when it is absent."""
    low, high = 0, len(items) - 1
    while low <= high:
        mid = (low + high) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            low = mid + 1
        else:
            high = mid - 1
    return -1


def insertion_sort(items):
    """Sort a short list in place by inserting each item where it belongs."""
    for position in range(1, len(items)):
        current = items[position]
        k = position - 1
        while k >= 0 and items[k] > current:
            items[k + 1] = items[k]
            k -= 1
        items[k + 1] = current
    return items
'''

WHITESPACE_COPY = ORIGINAL.replace("    ", "  ").replace("\n\n\n", "\n\n")
RENAMED_VARIABLE = ORIGINAL.replace("middle", "half")
EDITED_COMMENTS = ORIGINAL.replace("Merge two sorted lists into one sorted list.", "Combine two ordered lists.")

DISTINCT = [
    '''class Stack:
    """A last-in first-out stack."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from an empty stack")
        return self._items.pop()
''',
    '''import json
from pathlib import Path


def load_settings(path):
    """Read settings from a JSON file, with defaults for missing keys."""
    defaults = {"debug": False, "port": 8080, "host": "127.0.0.1"}
    data = json.loads(Path(path).read_text())
    return {**defaults, **data}
''',
    '''def fibonacci(n):
    """The n-th Fibonacci number, iteratively."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def is_prime(n):
    if n < 2:
        return False
    return all(n % k for k in range(2, int(n ** 0.5) + 1))
''',
]


def run(texts: list[str]) -> tuple[list[bool], Deduplicator]:
    dedup = Deduplicator()
    return [dedup.keep(t, minhash_signature(t)) for t in texts], dedup


def test_exact_copies_up_to_whitespace_are_removed():
    kept, dedup = run([ORIGINAL, ORIGINAL, " ".join(ORIGINAL.split())])
    assert kept == [True, False, False] and dedup.exact_duplicates == 2


def test_near_copies_are_removed_and_distinct_files_kept():
    texts = [ORIGINAL, WHITESPACE_COPY, RENAMED_VARIABLE, EDITED_COMMENTS, *DISTINCT]
    kept, dedup = run(texts)
    # 7 files in, 4 kept: 1 copy equal after whitespace normalization, 2 near copies
    # (5-gram Jaccard with the original: renamed variable 0.86, edited docstring 0.89; threshold 0.7)
    assert kept == [True, False, False, False, True, True, True]
    assert (dedup.exact_duplicates, dedup.near_duplicates) == (1, 2)


def test_similar_but_different_programs_are_kept():
    kept, _ = run(DISTINCT)
    assert all(kept)
