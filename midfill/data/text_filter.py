"""Natural-language files (markdown, rst, txt): keep them only if English and about computing.

English: py3langid (langid.py's model, shipped inside the package; nothing is downloaded), on the
prose with code blocks removed, probability >= 0.5.

Computer science: a transparent lexicon classifier. The score is the share of words that are
computing terms, plus a small bonus for inline code and code blocks; a document is kept at a score
of at least CS_THRESHOLD. On the labelled sample in tests/data/cs_topic_sample.jsonl (20 computing,
20 other paragraphs) it scores precision 1.00 and recall 1.00 (tests/test_data_filters.py checks it);
the sample is small and its classes are far apart, so expect lower numbers on borderline text
(hardware, mathematics, science writing).
"""

from __future__ import annotations

import functools
import re

CODE_BLOCK = re.compile(r"```.*?```|~~~.*?~~~|`[^`\n]+`", re.DOTALL)
WORD = re.compile(r"[a-z][a-z0-9+#]*")
CS_THRESHOLD = 0.05
ENGLISH_MIN_PROBABILITY = 0.5

CS_LEXICON = frozenset("""
algorithm algorithms api apis array arrays assembly async asynchronous authentication await backend binary bit
bits boolean branch browser buffer bug bugs build builds byte bytes bytecode cache caching callback
checkout ci class classes cli client clone code codebase commit commits compile compiled compiler compilers
component components compute computing concurrency concurrent config configuration configure constructor
container containers cpu css cursor data database databases dataset deadlock debug debugger declared
dependency dependencies deploy deployment deprecated deserialize developer docker dockerfile documentation dom
endpoint endpoints enum error errors exception exceptions executable execute execution fork framework
frameworks frontend function functions garbage git github gpu gradient graph hash hashing heap html http
https implementation implements import index indexes inheritance input install installation instance integer
interface interpreter iterator java javascript json kernel key keys lambda latency library libraries linker
linter linux lock loop loops machine malloc memory merge method methods module modules mutex network node
nodes null object objects opcode operating optimizer output package packages parameter parameters parse parser
parsing pip pointer pointers process processes processor program programming programs protocol python query
queries queue recursion recursive refactor register regex release repo repository request requests response
return returns runtime rust schema script scripts sdk serialize server servers shell socket software sort
sorting source sql stack string strings struct syntax system thread threads token tokens tree tuple type
types typescript unicode unit variable variables vector version virtual web website windows xml yaml
""".split())


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # the model loads once per process

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def prose(text: str) -> str:
    return CODE_BLOCK.sub(" ", text)


def is_english(text: str) -> bool:
    sample = prose(text)[:5000]
    if not sample.strip():
        return False
    lang, probability = _identifier().classify(sample)
    return lang == "en" and probability >= ENGLISH_MIN_PROBABILITY


def cs_score(text: str) -> float:
    words = WORD.findall(prose(text).lower())
    if not words:
        return 0.0
    code_spans = len(CODE_BLOCK.findall(text))
    return sum(w in CS_LEXICON for w in words) / len(words) + 0.01 * min(code_spans, 10)


def is_computer_science(text: str) -> bool:
    return cs_score(text) >= CS_THRESHOLD
