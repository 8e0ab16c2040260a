"""Teacher answers: the base model's own greedy full-cache answer to each prompt, with its targets.

Training keeps only the answers on disk (`AnswerStore`: token ids, a JSON line per prompt, tiny) and
recomputes everything else when a prompt is used (`TeacherSource`): one prefill of the prompt, whose
K/V serve the training steps (the LoRA acts on the lookahead rows only, so the prompt's K/V never
change), and one teacher-forced pass of the stored answer over that cache for the target
(targets.answer_importance). Decoding, the expensive part, happens once per prompt.

`build_records` writes whole records (ids, answer, target, optional K/V) as safetensors files,
atomically and resumably; the held-out report reads those.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, StaticCache
from transformers.masking_utils import sdpa_mask

from ..runtime.eviction import encode_prompt, eos_ids
from .data import Sample
from .targets import answer_importance

GROUPED_SDPA = "lookaheadkv_grouped_sdpa"


def _grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """torch's SDPA on the K/V heads as they are (enable_gqa). HF's SDPA path copies K/V once per query
    head whenever a mask is given, which at every step of a padded batch decode copies the whole cache."""
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = is_causal if is_causal is not None else query.shape[2] > 1 and attention_mask is None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


@dataclass
class TeacherRecord:
    key: str
    task: str
    prompt_ids: torch.Tensor  # [P] int64
    answer_ids: torch.Tensor  # [A] int64
    importance: torch.Tensor  # [L, Hkv, P] float32, each row sums to 1
    keys: torch.Tensor | None  # [L, Hkv, P, D] in the teacher's dtype, when kept
    values: torch.Tensor | None

    @property
    def num_prompt(self) -> int:
        return int(self.prompt_ids.shape[0])

    def prompt_kv(self, device, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [1, Hkv, P, D], the layout `lookahead_stream` takes."""
        if self.keys is None:
            raise ValueError(f"record {self.key} was built without the prompt K/V (store_kv=False)")
        keys, values = self.keys.to(device, dtype), self.values.to(device, dtype)
        return [(keys[i][None], values[i][None]) for i in range(keys.shape[0])]


@torch.no_grad()
def teach(
    model,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    answers: list[torch.Tensor | None] | None = None,
    store_kv: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """The tensors of one record per prompt (1-D id tensors): answer, importance, optional prompt K/V.

    Each prompt is prefilled on its own (no padding: the prefill is most of the cost, and a padded
    batch would run the masked attention path). `answers[i]`, when given, is prompt i's stored teacher
    answer; the others are decoded greedily together (`greedy_answers`). The target is then computed
    by running each answer over its prompt's cache (teacher forcing). K/V stay in the model's dtype.
    """
    device = next(model.parameters()).device
    answers = list(answers) if answers is not None else [None] * len(prompts)
    if len(answers) != len(prompts):
        raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts")
    caches, first_tokens = [], []
    for prompt in prompts:
        cache = DynamicCache()
        out = model(input_ids=prompt[None].to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        caches.append(cache)
        first_tokens.append(out.logits[0, -1].argmax())
    todo = [i for i, answer in enumerate(answers) if answer is None]
    if todo:
        decoded = greedy_answers(
            model, [caches[i] for i in todo], torch.stack([first_tokens[i] for i in todo]), max_new_tokens
        )
        for i, answer in zip(todo, decoded):
            answers[i] = answer
    records = []
    for prompt, cache, answer in zip(prompts, caches, answers):
        tensors = {"prompt_ids": prompt.cpu(), "answer_ids": answer.cpu()}
        if store_kv:  # the cache grows by the answer below; these are the prompt's own tensors
            tensors["keys"] = torch.stack([layer.keys[0] for layer in cache.layers]).cpu()
            tensors["values"] = torch.stack([layer.values[0] for layer in cache.layers]).cpu()
        importance = answer_importance(model, cache, answer[None].to(device))
        tensors["importance"] = torch.stack([s[0] for s in importance]).float().cpu()
        records.append(tensors)
    return records


@torch.no_grad()
def greedy_answers(model, caches: list, first_tokens: torch.Tensor, max_new_tokens: int) -> list[torch.Tensor]:
    """The greedy continuation of each prompt cache, decoded as one left-padded batch.

    `first_tokens` [B] are the argmax of each prefill's last logits. The prompts' caches are copied
    into one preallocated batch cache (left padding, masked; a growing cache would copy itself at
    every step); every row keeps its true positions. An answer ends at its first EOS, included, or
    after `max_new_tokens` tokens. The caches are not modified.
    """
    device = first_tokens.device
    eos = eos_ids(model)
    lengths = torch.tensor([cache.get_seq_length() for cache in caches], device=device)
    longest = int(lengths.max())
    batch = StaticCache(config=model.config, max_cache_len=longest + max_new_tokens)
    for idx in range(len(caches[0].layers)):
        reference = caches[0].layers[idx].keys
        keys = reference.new_zeros(len(caches), reference.shape[1], longest, reference.shape[3])
        values = torch.zeros_like(keys)
        for row, cache in enumerate(caches):
            n = cache.layers[idx].keys.shape[2]
            keys[row, :, longest - n :] = cache.layers[idx].keys[0]
            values[row, :, longest - n :] = cache.layers[idx].values[0]
        batch.update(keys, values, idx, {"cache_position": torch.arange(longest, device=device)})
    mask = (torch.arange(longest, device=device)[None] >= (longest - lengths)[:, None]).long()
    tokens = first_tokens.clone()
    generated = [tokens]
    done = torch.tensor([int(t) in eos for t in tokens.tolist()], device=device)
    attention = model.config._attn_implementation
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        for step in range(1, max_new_tokens):
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(caches), 1)], dim=1)
            logits = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=(lengths + step - 1)[:, None],
                cache_position=torch.tensor([longest + step - 1], device=device),
                past_key_values=batch,
                use_cache=True,
            ).logits[:, -1]
            tokens = logits.argmax(dim=-1)
            generated.append(tokens)
            done |= torch.tensor([int(t) in eos for t in tokens.tolist()], device=device)
    finally:
        model.set_attn_implementation(attention)
    sequences = torch.stack(generated, dim=1)
    return [_until_eos(row, eos) for row in sequences]


def _until_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    for i, token in enumerate(tokens.tolist()):
        if token in eos:
            return tokens[: i + 1]
    return tokens


class AnswerStore:
    """Teacher answers by prompt key, in a JSON-lines file: {"key", "prompt_sha256", "answer_ids"}.

    Appended as answers are decoded (an interrupted run keeps every finished line); an answer is
    returned only for the exact prompt ids it was decoded from, so a changed prompt is answered again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._answers: dict[str, tuple[str, list[int]]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interruption
                    continue
                self._answers[entry["key"]] = (entry["prompt_sha256"], entry["answer_ids"])

    def __len__(self) -> int:
        return len(self._answers)

    @staticmethod
    def prompt_hash(prompt_ids: torch.Tensor) -> str:
        return hashlib.sha256(prompt_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()

    def get(self, key: str, prompt_ids: torch.Tensor) -> torch.Tensor | None:
        found = self._answers.get(key)
        if found is None or found[0] != self.prompt_hash(prompt_ids):
            return None
        return torch.tensor(found[1], dtype=torch.long)

    def add(self, key: str, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> None:
        entry = {"key": key, "prompt_sha256": self.prompt_hash(prompt_ids), "answer_ids": answer_ids.tolist()}
        self._answers[key] = (entry["prompt_sha256"], entry["answer_ids"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class Prompt:
    key: str
    task: str
    ids: torch.Tensor  # [P] int64, chat-formatted


class TeacherSource:
    """Records of `prompts` made on demand: stored answers reused, missing ones decoded and stored.

    `records(indices)` prefills each prompt once with `model` (which may be a lower-precision copy
    of the trained model: the teacher's K/V and answers do not depend on the lookahead module),
    decodes the prompts without a stored answer `batch_size` at a time, and returns the records with
    their prompt K/V, in the order of `indices`.
    """

    def __init__(self, model, prompts: list[Prompt], store: AnswerStore, *, max_new_tokens: int, batch_size: int = 8):
        self.model, self.prompts, self.store = model, prompts, store
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __len__(self) -> int:
        return len(self.prompts)

    def records(self, indices: list[int]) -> list[TeacherRecord]:
        made: dict[int, TeacherRecord] = {}
        # Prompts of similar length decode together: the batch pads to its longest.
        unique = sorted(set(indices), key=lambda i: self.prompts[i].ids.shape[0])
        for first in range(0, len(unique), self.batch_size):
            chunk = [self.prompts[i] for i in unique[first : first + self.batch_size]]
            stored = [self.store.get(p.key, p.ids) for p in chunk]
            tensors = teach(self.model, [p.ids for p in chunk], self.max_new_tokens, answers=stored)
            for i, prompt, answer, t in zip(unique[first : first + self.batch_size], chunk, stored, tensors):
                if answer is None:
                    self.store.add(prompt.key, prompt.ids, t["answer_ids"])
                made[i] = TeacherRecord(
                    prompt.key, prompt.task, t["prompt_ids"], t["answer_ids"], t["importance"], t["keys"], t["values"]
                )
        return [made[i] for i in indices]


def encode_samples(tokenizer, samples: list[Sample]) -> list[Prompt]:
    """The chat-formatted prompt ids of each sample, as the teacher and the runtime encode them."""
    return [Prompt(s.key, s.task, encode_prompt(tokenizer, s.prompt, None, "cpu")[0]) for s in samples]


def record_path(directory: str | Path, sample: Sample) -> Path:
    return Path(directory) / sample.split / f"{sample.key}.safetensors"


def build_records(
    model,
    tokenizer,
    samples: list[Sample],
    directory: str | Path,
    *,
    max_new_tokens: int = 64,
    store_kv: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Path]:
    """Write the record of every sample not yet on disk under `directory` (or on disk for another prompt);
    return all their paths.

    Samples are answered `batch_size` at a time; each finished batch is on disk before the next
    starts, so an interrupted build loses at most one batch.
    """
    device = next(model.parameters()).device
    paths = [record_path(directory, s) for s in samples]
    # A record is reused only if it answers the same prompt: records are named by split, index and
    # task, which stay the same when the data generator changes what a sample's prompt says.
    todo = [(s, p) for s, p in zip(samples, paths) if not p.is_file() or record_text(p).get("prompt") != s.prompt]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="teacher answers", disable=not progress)
    for first in range(0, len(todo), batch_size):
        chunk = todo[first : first + batch_size]
        prompts = [encode_prompt(tokenizer, sample.prompt, None, device)[0] for sample, _ in chunk]
        for (sample, path), tensors in zip(chunk, teach(model, prompts, max_new_tokens, store_kv=store_kv)):
            answer = tokenizer.decode(tensors["answer_ids"], skip_special_tokens=True)
            write_record(path, tensors, key=sample.key, task=sample.task, prompt=sample.prompt, answer=answer)
        bar.update(len(chunk))
    bar.close()
    return paths


def write_record(
    path: str | Path, tensors: dict[str, torch.Tensor], *, key: str, task: str, prompt: str = "", answer: str = ""
) -> Path:
    """Write the tensors of `teach` and their texts as one record file, atomically (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        metadata = {"key": key, "task": task, "prompt": prompt, "answer": answer}
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_record(path: str | Path) -> TeacherRecord:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return TeacherRecord(
        key=meta["key"],
        task=meta["task"],
        prompt_ids=tensors["prompt_ids"],
        answer_ids=tensors["answer_ids"],
        importance=tensors["importance"],
        keys=tensors.get("keys"),
        values=tensors.get("values"),
    )


def record_text(path: str | Path) -> dict[str, str]:
    """The prompt, answer, key and task stored with a record (for inspection)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())
