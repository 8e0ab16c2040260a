"""An offline long-context task suite in the style of RULER, generated from fixed seeds.

Eight tasks: needle-in-a-haystack (single, multi-key, multi-value, multi-query), variable tracking,
common-word and frequent-word extraction, and question answering over generated facts. Haystacks are
verses of the New Testament (`data/kjv_eval.txt.gz`); training draws its filler from Genesis–Joshua
and its tasks are long-document QA, records, code and summarisation, so no evaluation prompt shares
filler or task format with training.

A sample is fitted to a length L in tokens of the chat-formatted prompt the same way RULER does:
prompt + the task's answer allowance <= L. Every random choice of a sample (keys, values, needle
depths, distractors) is drawn from a generator seeded by (seed, task, length, index) *before* the
filler is sized, so a sample never depends on the tokenizer except through its filler length.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ..argtypes import parse_names

TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "fact_qa",
)
LENGTHS = (1024, 2048, 4096, 8192)
MIN_LENGTH = 256  # shortest prompt a sample is built for: room for the question, the answer and some filler
DEFAULT_SEED = 1234

# Word lists for needle keys and generated facts: invented or common words only, so the model cannot
# answer from prior knowledge.
_ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lively mellow noisy odd pale quiet "
    "rapid rusty silent tidy upbeat vivid wary young zesty bitter cosy damp fuzzy grumpy humble loyal "
    "misty nimble proud sturdy tender woolly"
).split()
_NOUNS = (
    "badger beacon canyon dolphin ember falcon glacier harbor island jaguar kettle lantern meadow "
    "nectar orchard pebble quarry raven saddle thicket umbrella valley walrus yacht zephyr anchor "
    "bramble cobalt drum fossil gazelle hammock ivory juniper kiosk lagoon marble"
).split()
_SYLLABLES = "ka lo mi ra ven tor sil dar bel mun quo zan fer gri hal nor pas tew vor lin".split()
_ATTRIBUTES = (
    # (question, statement, answer pool)
    ("Which city does {name} live in?", "{name} lives in the city of {value}.", "cities"),
    ("What is the name of {name}'s pet?", "{name} has a pet whose name is {value}.", "pets"),
    ("Which instrument does {name} play?", "{name} plays the {value} every evening.", "instruments"),
)
_INSTRUMENTS = "cello harp oboe banjo flute tuba lute sitar viola bassoon clarinet trombone ukulele marimba".split()


@dataclass(frozen=True)
class Sample:
    """One prompt of the suite and its reference answers."""

    task: str
    length: int  # the token length this sample was fitted to (prompt + answer allowance)
    index: int
    context: str  # the long document
    question: str  # asked after the document
    answer_prefix: str  # opens the assistant turn, as RULER's templates do
    answers: tuple[str, ...]
    max_new_tokens: int

    @property
    def uid(self) -> str:
        return f"{self.task}/{self.length}/{self.index}"


def prompt_text(sample: Sample, tokenizer) -> str:
    """The model input as text: the chat-formatted user turn, the assistant turn opened with the answer prefix."""
    messages = [{"role": "user", "content": f"{sample.context}\n\n{sample.question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + sample.answer_prefix


def prompt_ids(sample: Sample, tokenizer) -> list[int]:
    return tokenizer(prompt_text(sample, tokenizer), add_special_tokens=False).input_ids


def score(prediction: str, answers) -> float:
    """RULER's string-match-all: the fraction of reference answers found in the prediction (case-insensitive).

    Tasks with one answer reduce to exact containment (1 or 0); tasks that ask for several items
    (multi-value, multi-query, variable tracking, word extraction) get partial credit.
    """
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


# ---- filler and word pools -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _verses() -> tuple[str, ...]:
    with resources.files("lookaheadkv_kernels.data").joinpath("kjv_eval.txt.gz").open("rb") as raw:
        return tuple(line for line in gzip.decompress(raw.read()).decode("utf-8").splitlines() if line.strip())


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of the evaluation text (4-10 letters), in a fixed order."""
    words = set()
    for verse in _verses():
        words.update(w for w in re.findall(r"[a-z]+", verse.lower()) if 4 <= len(w) <= 10)
    return tuple(sorted(words))


def _filler(rng: random.Random, count: int) -> list[str]:
    """`count` consecutive verses from a random starting verse (wrapping around)."""
    verses = _verses()
    start = rng.randrange(len(verses))
    return [verses[(start + i) % len(verses)] for i in range(count)]


def _insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert each needle between filler units at its relative depth in [0, 1]."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: pair[1], reverse=True):
        out.insert(round(depth * len(units)), needle)
    return out


def _magic_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _magic_number(rng: random.Random, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(1_000_000, 10_000_000))
        if value not in taken:
            taken.add(value)
            return value


def _invented_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


# ---- tasks: each returns (build(n) -> (context, question, prefix, answers), max_new_tokens) ---------

_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n"
)


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah(rng: random.Random, num_keys: int, num_values: int, num_queries: int):
    keys_taken, values_taken = set(), set()
    keys = [_magic_key(rng, keys_taken) for _ in range(num_keys)]
    values = {key: [_magic_number(rng, values_taken) for _ in range(num_values)] for key in keys}
    needles = [_needle(key, value) for key in keys for value in values[key]]
    rng.shuffle(needles)
    depths = [rng.random() for _ in needles]
    queried = keys[:num_queries]
    answers = tuple(value for key in queried for value in values[key])
    seed = rng.random()

    if num_queries > 1:
        listed = ", ".join(queried[:-1]) + f", and {queried[-1]}"
        question = f"What are all the special magic numbers for {listed} mentioned in the provided text?"
        prefix = f"The special magic numbers for {listed} mentioned in the provided text are"
    elif num_values > 1:
        question = f"What are all the special magic numbers for {queried[0]} mentioned in the provided text?"
        prefix = f"The special magic numbers for {queried[0]} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {queried[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {queried[0]} mentioned in the provided text is"

    def build(n):
        units = _insert(_filler(random.Random(seed), n), needles, depths)
        return _NIAH_INTRO + " ".join(units), question, prefix, answers

    return build, 12 * len(answers) + 8


def _variable_tracking(rng: random.Random, num_hops: int = 4, num_chains: int = 2):
    names_taken, values_taken = set(), set()

    def variable():
        while True:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names_taken:
                names_taken.add(name)
                return name

    chains = []
    for _ in range(num_chains):
        names = [variable() for _ in range(num_hops + 1)]
        value = str(rng.randrange(10_000, 100_000))
        while value in values_taken:
            value = str(rng.randrange(10_000, 100_000))
        values_taken.add(value)
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        chains.append((names, value, statements))
    # Statements of one chain keep their order (each assignment follows the one it copies).
    statements, depths = [], []
    for _, _, chain in chains:
        spots = sorted(rng.random() for _ in chain)
        statements += chain
        depths += spots
    names, value, _ = chains[0]
    seed = rng.random()
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} "
        f"variables are assigned the value {value}, they are:"
    )

    def build(n):
        units = _insert(_filler(random.Random(seed), n), statements, depths)
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        return intro + " ".join(units), question, prefix, tuple(names)

    return build, 40


def _common_words(rng: random.Random, length: int, num_common: int = 10):
    vocabulary = list(_vocabulary())
    rng.shuffle(vocabulary)
    common, rare = vocabulary[:num_common], vocabulary[num_common:]
    # RULER scales repetitions with the context: common words stay clearly the most frequent.
    common_count = {1024: 6, 2048: 10, 4096: 18, 8192: 30}.get(length, max(6, length // 280))
    rare_count = 2
    seed = rng.random()
    question = "What are the 10 most common words in the above list?"
    prefix = "Answer: The top 10 words that appear most often in the list are:"

    def build(n):
        words = common * common_count + rare[:n] * rare_count
        random.Random(seed).shuffle(words)
        listing = " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))
        intro = "Below is a numbered list of words. In these words, some appear more often than others.\n"
        return intro + listing, question, prefix, tuple(common)

    return build, 64


def _frequent_words(rng: random.Random, alpha: float = 2.0, vocabulary_size: int = 400):
    codes, taken = [], set()
    while len(codes) < vocabulary_size:
        code = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6)))
        if code not in taken:
            taken.add(code)
            codes.append(code)
    weights = [1.0 / (rank + 1) ** alpha for rank in range(vocabulary_size)]
    seed = rng.random()
    question = (
        "What are the three most frequently appeared coded words in the above coded text? "
        "Do not provide any explanation."
    )
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"

    def build(n):
        # Each length draws a fresh stream from the sample's seed; the answer is whatever its top 3 are.
        words = random.Random(seed).choices(codes, weights=weights, k=n)
        counts = Counter(words).most_common(4)
        if len(counts) == 4 and counts[2][1] == counts[3][1]:
            words.append(counts[2][0])  # break a tie for third place so the answer is unique
        top = [word for word, _ in Counter(words).most_common(3)]
        intro = "Read the following coded text and track the frequency of each coded word.\n"
        return intro + " ".join(words), question, prefix, tuple(top)

    return build, 32


def _fact_qa(rng: random.Random, num_people: int = 8):
    pools = {
        "cities": lambda: _invented_name(rng, 3),
        "pets": lambda: _invented_name(rng, 2),
        "instruments": lambda: rng.choice(_INSTRUMENTS),
    }
    people = []
    seen = set()
    while len(people) < num_people:
        name = f"{_invented_name(rng, 2)} {_invented_name(rng, 3)}"
        if name not in seen:
            seen.add(name)
            people.append(name)
    facts, attribute_values = [], {}
    for name in people:
        for question, statement, pool in _ATTRIBUTES:
            value = pools[pool]()
            attribute_values[(name, question)] = value
            facts.append(statement.format(name=name, value=value))
    rng.shuffle(facts)
    depths = [rng.random() for _ in facts]
    target = rng.choice(people)
    question_template = rng.choice(_ATTRIBUTES)[0]
    answer = attribute_values[(target, question_template)]
    seed = rng.random()
    question = question_template.format(name=target) + " Answer with the name only."
    prefix = "Answer:"

    def build(n):
        units = _insert(_filler(random.Random(seed), n), facts, depths)
        intro = "Read the following documents; some of them mention facts about people.\n"
        return intro + " ".join(units), question, prefix, (answer,)

    return build, 16


def parse_tasks(text: str) -> list[str]:
    """Tasks from "niah_single,fact_qa"; at least one, each a known task."""
    return parse_names(text, TASKS, "tasks")


def _task_builder(task: str, rng: random.Random, length: int) -> tuple[Callable, int]:
    if task == "niah_single":
        return _niah(rng, num_keys=1, num_values=1, num_queries=1)
    if task == "niah_multikey":
        return _niah(rng, num_keys=4, num_values=1, num_queries=1)
    if task == "niah_multivalue":
        return _niah(rng, num_keys=1, num_values=4, num_queries=1)
    if task == "niah_multiquery":
        return _niah(rng, num_keys=4, num_values=1, num_queries=4)
    if task == "variable_tracking":
        return _variable_tracking(rng)
    if task == "common_words":
        return _common_words(rng, length)
    if task == "frequent_words":
        return _frequent_words(rng)
    if task == "fact_qa":
        return _fact_qa(rng)
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def _sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{task}/{length}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_sample(task: str, length: int, index: int, tokenizer, seed: int = DEFAULT_SEED) -> Sample:
    """The sample `index` of `task` at `length` tokens: the most filler for which prompt + answer fit."""
    if length < MIN_LENGTH:
        raise ValueError(f"length must be >= {MIN_LENGTH} tokens, got {length}")
    build, max_new_tokens = _task_builder(task, _sample_rng(seed, task, length, index), length)
    limit = length - max_new_tokens

    def fitted(n):
        context, question, prefix, answers = build(n)
        sample = Sample(task, length, index, context, question, prefix, answers, max_new_tokens)
        return sample if len(prompt_ids(sample, tokenizer)) <= limit else None

    # Filler units are sentences or words, at least one token each: `limit` units always overflow.
    low, high = 0, limit
    best = fitted(0)
    if best is None:
        raise ValueError(f"{task} does not fit in {length} tokens even without filler")
    while low < high:  # largest n that fits (prompt length grows with n)
        mid = (low + high + 1) // 2
        candidate = fitted(mid)
        if candidate is None:
            high = mid - 1
        else:
            low, best = mid, candidate
    return best


def make_suite(
    tokenizer,
    tasks=TASKS,
    lengths=LENGTHS,
    num_samples: int = 4,
    seed: int = DEFAULT_SEED,
) -> list[Sample]:
    """Every (task, length, index) sample, ordered by length, then task, then index."""
    return [
        make_sample(task, length, index, tokenizer, seed)
        for length in lengths
        for task in tasks
        for index in range(num_samples)
    ]
