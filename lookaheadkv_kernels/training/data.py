"""Offline generator of long-context instruction prompts for training lookahead modules.

No network: every document is assembled from bundled public-domain text (`data/kjv_train.txt.gz`,
Genesis–Joshua of the King James Bible) or generated here (record tables, Python modules, labelled
sentences). The mix follows the paper's kinds of training data — long-document QA, instructions,
code and few-shot prompts:

| task                  | document                                   | request                                          |
|-----------------------|--------------------------------------------|--------------------------------------------------|
| `passage_qa`          | contiguous KJV verses                      | quote / continue / who-speaks questions on one verse |
| `passage_summary`     | contiguous KJV verses                      | summary, title, list of the people or places      |
| `passage_instruction` | contiguous KJV verses                      | rewrite / explain one verse, write study questions |
| `record_lookup`       | table of generated staff records           | one field of one record, by id or by name         |
| `record_aggregate`    | table of generated staff records           | count / list / oldest over a department or city   |
| `code_qa`             | generated Python module                    | callers of a function, defaults, what it returns  |
| `few_shot`            | many labelled sentences (6 topics)         | the topic of a new sentence                       |

These are deliberately not the evaluation suite's tasks (needle-in-a-haystack, variable tracking,
common/frequent-word extraction, QA over generated facts), and the evaluation suite's filler text
(`kjv_eval.txt.gz`, the New Testament) is never read here.

Splits: "train" draws its passages from the first `TRAIN_VERSES` verses, "heldout" from the rest,
and the two use disjoint seed streams, so no held-out prompt shares a passage, a record table or a
module with a training prompt. A sample is fully determined by (split, index, seed, length range).
"""

from __future__ import annotations

import gzip
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TRAIN_TEXT = Path(__file__).resolve().parent.parent / "data" / "kjv_train.txt.gz"
TRAIN_VERSES = 5600  # of the file's 6510 verses; the remainder (late Deuteronomy and Joshua) is held out
SPLITS = ("train", "heldout")
# Seed streams: sample i of a split uses seed (SPLIT_OFFSET[split] + seed) * 1_000_003 + i.
SPLIT_OFFSET = {"train": 0, "heldout": 7919}

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Sample:
    """One training prompt: the user message (the chat template is applied by the teacher)."""

    split: str
    index: int
    task: str
    prompt: str
    target_tokens: int  # the document was grown to about this many tokens

    @property
    def key(self) -> str:
        return f"{self.split}-{self.index:05d}-{self.task}"


@lru_cache(maxsize=1)
def _all_verses() -> tuple[str, ...]:
    with gzip.open(TRAIN_TEXT, "rt", encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip())


def verses(split: str) -> tuple[str, ...]:
    """The verses a split may use (train: the first TRAIN_VERSES, heldout: the rest)."""
    _check_split(split)
    every = _all_verses()
    return every[:TRAIN_VERSES] if split == "train" else every[TRAIN_VERSES:]


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _grow(units: Iterator[str], target_tokens: int, count: TokenCounter) -> list[str]:
    """Take units (lines or blocks) until their token count reaches target_tokens (at least one)."""
    taken, total = [], 0
    for unit in units:
        taken.append(unit)
        total += count(unit) + 1  # +1: the newline joining units
        if total >= target_tokens:
            break
    return taken


# ---- KJV passages ---------------------------------------------------------------------------

_NAME = re.compile(r"\b[A-Z][a-z]{2,}\b")
_COMMON_CAPITALISED = {
    "And",
    "The",
    "Then",
    "But",
    "For",
    "Now",
    "When",
    "Thus",
    "Thou",
    "Thy",
    "Lord",
    "God",
    "Behold",
    "This",
    "That",
    "Ye",
    "Yea",
    "Let",
    "What",
    "Wherefore",
    "Who",
    "These",
    "There",
    "Also",
    "So",
    "If",
    "Israel",
    "Which",
    "Because",
    "His",
    "Her",
    "They",
    "Are",
    "Hath",
    "Hast",
    "Neither",
    "Nor",
    "Therefore",
    "With",
    "Unto",
    "Come",
    "Go",
    "Take",
    "Make",
    "Ask",
    "Surely",
    "Whosoever",
    "Moreover",
    "Likewise",
    "After",
    "All",
    "Of",
    "In",
    "Is",
    "It",
    "My",
    "Our",
    "Your",
    "Why",
    "How",
    "O",
    "Shall",
    "Every",
    "Whether",
    "Hear",
    "See",
}


def _passage(rng: random.Random, split: str, target_tokens: int, count: TokenCounter) -> list[str]:
    pool = verses(split)
    start = rng.randrange(len(pool))
    lines = _grow((pool[(start + i) % len(pool)] for i in range(len(pool))), target_tokens, count)
    return lines


def _opening(verse: str, words: int = 8) -> str:
    head = verse.split()[:words]
    return " ".join(head).rstrip(",;:.")


def _names(lines: list[str]) -> list[str]:
    seen = dict.fromkeys(n for line in lines for n in _NAME.findall(line) if n not in _COMMON_CAPITALISED)
    return list(seen)


def _with_request(rng: random.Random, document: str, request: str, intro: str) -> str:
    """The request after the document, and in a fifth of the prompts also before it."""
    if rng.random() < 0.2:
        return f"{request}\n\n{intro}\n\n{document}\n\n{request}"
    return f"{intro}\n\n{document}\n\n{request}"


def passage_qa(rng, split, target_tokens, count):
    lines = _passage(rng, split, target_tokens, count)
    verse_idx = rng.randrange(len(lines))
    verse = lines[verse_idx]
    names = _names([verse])
    words = [w.strip(",;:.?!()'") for w in verse.split()]
    rare = max(words, key=len)
    kinds = ["quote", "after", "before", "who"] if names else ["quote", "after", "before"]
    kind = rng.choice(kinds)
    if kind == "quote":
        request = f'Quote, word for word, the verse of the passage that contains the word "{rare}".'
    elif kind == "after":
        request = f'What does the passage say right after the verse that begins "{_opening(verse)}"?'
    elif kind == "before":
        request = f'Which verse comes just before the one that begins "{_opening(verse)}"? Quote it.'
    else:
        request = f'In the verse that begins "{_opening(verse)}", what is said about {rng.choice(names)}?'
    return _with_request(rng, "\n".join(lines), request, "Read the following passage carefully.")


def passage_summary(rng, split, target_tokens, count):
    lines = _passage(rng, split, target_tokens, count)
    request = rng.choice(
        [
            f"Summarise the passage above in {rng.choice(['two', 'three', 'four'])} sentences.",
            "Give the passage a short title, then explain the title in one sentence.",
            "List the people named in the passage and say in a few words what each of them does.",
            "List the places mentioned in the passage, in the order they first appear.",
            "What is the main event of the passage? Answer in one paragraph.",
        ]
    )
    return _with_request(rng, "\n".join(lines), request, "Here is a passage from an old book.")


def passage_instruction(rng, split, target_tokens, count):
    lines = _passage(rng, split, target_tokens, count)
    verse = lines[rng.randrange(len(lines))]
    request = rng.choice(
        [
            f'Rewrite the verse that begins "{_opening(verse)}" in plain modern English.',
            f'Explain the verse that begins "{_opening(verse)}" to a ten-year-old.',
            "Write three questions a student could ask about this passage, each with its answer.",
            f'Turn the verse that begins "{_opening(verse)}" into a short bulleted list of its facts.',
            "Pick the verse of the passage that mentions the most people and quote it.",
        ]
    )
    return _with_request(rng, "\n".join(lines), request, "Use the text below to complete the task.")


# ---- generated record tables ------------------------------------------------------------------

_FIRST = (
    "Alma Boris Chen Dalia Emeka Farah Goran Hana Ivo Jun Kamala Lars Mira Nadia Omar Petra Quinn Rosa Sven Tariq "
    "Uma Viktor Wen Ximena Yusuf Zora Aiko Bruno Cleo Dmitri Elif Felix Greta Hugo Ines Jonas Kira Leon Mei Nils"
).split()
_LAST = (
    "Reyes Novak Okafor Lindqvist Haddad Moreau Tanaka Kowalski Silva Brennan Petrov Nakamura Castillo Varga Osei "
    "Fischer Larsen Duarte Mbeki Rossi Horvat Ibarra Sato Keller Nyberg Popescu Quispe Adler Banerjee Costa"
).split()
_CITIES = "Lisbon Oslo Nairobi Lima Hanoi Tbilisi Quito Riga Dakar Perth Kyoto Porto Accra Bergen Cusco".split()
_DEPARTMENTS = "logistics finance research legal support design sales security training facilities".split()


def _records(rng, target_tokens, count):
    used_ids = set()

    def one():
        while (rid := rng.randrange(1000, 9999)) in used_ids:
            pass
        used_ids.add(rid)
        return {
            "id": rid,
            "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
            "city": rng.choice(_CITIES),
            "age": rng.randrange(21, 66),
            "department": rng.choice(_DEPARTMENTS),
            "salary": rng.randrange(30, 160) * 100,
        }

    rows = []

    def line():
        rows.append(one())
        return " | ".join(f"{k}: {v}" for k, v in rows[-1].items())

    lines = _grow(iter(line, None), target_tokens, count)
    return rows, lines


def record_lookup(rng, split, target_tokens, count):
    rows, lines = _records(rng, target_tokens, count)
    row = rng.choice(rows)
    field = rng.choice(["city", "age", "department", "salary"])
    if rng.random() < 0.5:
        request = f"What is the {field} of the employee with id {row['id']}?"
    else:
        request = f"What is the {field} of {row['name']}? If several employees share that name, give each one."
    return _with_request(rng, "\n".join(lines), request, "The staff register below has one employee per line.")


def record_aggregate(rng, split, target_tokens, count):
    rows, lines = _records(rng, target_tokens, count)
    city, department = rng.choice(rows)["city"], rng.choice(rows)["department"]
    request = rng.choice(
        [
            f"How many employees work in the {department} department? List their ids.",
            f"List the names of all employees based in {city}.",
            f"Who is the oldest employee in the {department} department, and how old are they?",
            f"What is the total salary of the employees based in {city}?",
            f"Which departments have employees in {city}?",
        ]
    )
    return _with_request(rng, "\n".join(lines), request, "The staff register below has one employee per line.")


# ---- generated Python modules -------------------------------------------------------------------

_VERBS = "compute load merge scale parse filter render count split rotate encode collect score shift".split()
_NOUNS = "totals records weights tokens prices events matrix buffer ledger samples rows offsets labels".split()


def _code(rng, target_tokens, count):
    names: list[str] = []
    calls: dict[str, str | None] = {}  # function -> the earlier function it calls, if any

    def one():
        while (name := f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}") in calls:
            if len(calls) >= len(_VERBS) * len(_NOUNS):
                return None
        default = rng.randrange(2, 20)
        callee = rng.choice(names) if names and rng.random() < 0.6 else None
        names.append(name)
        calls[name] = callee
        op = rng.choice(["+", "-", "*"])
        inner = f"{callee}(items) {op} {rng.randrange(1, 50)}" if callee else f"len(items) {op} {rng.randrange(1, 50)}"
        return (
            f"def {name}(items, factor={default}):\n"
            f'    """{rng.choice(_VERBS).capitalize()} the {rng.choice(_NOUNS)} of items."""\n'
            f"    value = {inner}\n"
            f"    return value * factor\n"
        )

    blocks = _grow(iter(one, None), target_tokens, count)
    return names, calls, blocks


def code_qa(rng, split, target_tokens, count):
    names, calls, blocks = _code(rng, target_tokens, count)
    called = [n for n in names if n in calls.values()]
    name = rng.choice(names)
    kinds = ["default", "returns", "explain"] + (["callers"] if called else [])
    kind = rng.choice(kinds)
    if kind == "callers":
        request = f"Which functions in the module call `{rng.choice(called)}`?"
    elif kind == "default":
        request = f"What is the default value of `factor` in `{name}`?"
    elif kind == "returns":
        request = f"What does `{name}` return? Express it in terms of `items`."
    else:
        request = f"Explain step by step what `{name}` does."
    document = "```python\n" + "\n".join(blocks) + "```"
    return _with_request(rng, document, request, "Here is a Python module.")


# ---- few-shot topic classification ------------------------------------------------------------

# topic -> (sentence templates, words for {a}, phrases for {b})
_TOPICS = {
    "sports": (
        ("The {a} scored twice before {b}.", "Our {a} lost the final after {b}.", "The coach praised the {a} for {b}."),
        ("striker", "goalkeeper", "home team", "captain", "relay squad"),
        ("halftime", "a long injury break", "the penalty shootout", "extra time", "the second goal"),
    ),
    "weather": (
        ("Heavy {a} is expected over {b}.", "The {a} cleared by {b}.", "A cold {a} will reach {b} tonight."),
        ("rain", "fog", "snow", "hail", "wind"),
        ("the coast", "the northern hills", "noon", "the valley", "the capital"),
    ),
    "cooking": (
        ("Stir the {a} slowly into {b}.", "Bake the {a} until {b}.", "Season the {a} with {b}."),
        ("stew", "dough", "sauce", "batter", "soup"),
        ("the melted butter", "golden brown", "a pinch of salt", "the onions", "fresh thyme"),
    ),
    "travel": (
        ("The {a} to {b} was delayed.", "We booked a {a} near {b}.", "Pack light for the {a} through {b}."),
        ("train", "flight", "ferry", "hostel", "road trip"),
        ("the border", "the old harbour", "the mountains", "the airport", "the islands"),
    ),
    "music": (
        ("The {a} played a song about {b}.", "She tuned the {a} before {b}.", "The {a} sold out after {b}."),
        ("band", "violin", "choir", "orchestra", "guitar"),
        ("the encore", "the rehearsal", "the first album", "a lost summer", "the concert"),
    ),
    "finance": (
        ("The {a} rose sharply after {b}.", "Investors sold the {a} during {b}.", "The {a} report surprised {b}."),
        ("stock", "bond", "currency", "quarterly earnings", "pension fund"),
        ("the rate cut", "the analysts", "the market crash", "the merger", "the audit"),
    ),
}


def _sentence(rng, topic):
    templates, a_words, b_phrases = _TOPICS[topic]
    return rng.choice(templates).format(a=rng.choice(a_words), b=rng.choice(b_phrases))


def few_shot(rng, split, target_tokens, count):
    topics = sorted(_TOPICS)

    def one():
        topic = rng.choice(topics)
        return f"Sentence: {_sentence(rng, topic)}\nTopic: {topic}"

    examples = _grow(iter(one, None), target_tokens, count)
    query = _sentence(rng, rng.choice(topics))
    intro = f"Classify each sentence into one of these topics: {', '.join(topics)}. Examples:"
    return f"{intro}\n\n" + "\n\n".join(examples) + f"\n\nSentence: {query}\nTopic:"


TASKS: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (passage_qa, passage_summary, passage_instruction, record_lookup, record_aggregate, code_qa, few_shot)
}


def make_samples(
    split: str,
    count: int,
    count_tokens: TokenCounter,
    *,
    min_tokens: int = 512,
    max_tokens: int = 1024,
    seed: int = 0,
    start: int = 0,
    short_max: int | None = None,
    long_share: float = 0.0,
) -> list[Sample]:
    """`count` prompts of `split` (indices start..start+count-1), tasks cycling through TASKS.

    Each document grows to a length, in tokens as measured by `count_tokens` (the target model's
    tokenizer, without the chat template), drawn uniformly from [min_tokens, max_tokens]; or, with
    `short_max`, from [min_tokens, short_max] uniformly and, for a `long_share` of the prompts,
    log-uniformly from [short_max, max_tokens] (long prompts cost most of a training run's time).
    """
    _check_split(split)
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    if short_max is not None and not (min_tokens <= short_max <= max_tokens and 0 <= long_share <= 1):
        raise ValueError(
            f"need min_tokens <= short_max <= max_tokens and 0 <= long_share <= 1, got {short_max}, {long_share}"
        )
    names = list(TASKS)
    samples = []
    for index in range(start, start + count):
        rng = random.Random((SPLIT_OFFSET[split] + seed) * 1_000_003 + index)
        task = names[index % len(names)]
        if short_max is None:
            target = rng.randint(min_tokens, max_tokens)
        elif rng.random() < long_share:
            target = round(math.exp(rng.uniform(math.log(short_max), math.log(max_tokens))))
        else:
            target = rng.randint(min_tokens, short_max)
        samples.append(Sample(split, index, task, TASKS[task](rng, split, target, count_tokens), target))
    return samples
