"""Teacher answers: the base model's own greedy full-cache answer to each prompt, with its targets.

Each sample becomes one safetensors record on disk, written once (atomically) and reused: building
a set of records skips the ones already present, so an interrupted build resumes where it stopped.
A record holds the chat-formatted prompt ids, the greedy answer ids, the per-layer importance target
(targets.answer_importance) and, for training records, the prompt's K/V in float16 so that a
training step never re-runs the prefill.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..runtime.eviction import encode_prompt, eos_ids
from .data import Sample
from .targets import answer_importance

KV_DTYPE = torch.float16  # the stored prompt K/V: half the disk of float32; SmolLM2's |K|,|V| stay below 25


@dataclass
class TeacherRecord:
    key: str
    task: str
    prompt_ids: torch.Tensor  # [P] int64
    answer_ids: torch.Tensor  # [A] int64
    importance: torch.Tensor  # [L, Hkv, P] float32, each row sums to 1
    keys: torch.Tensor | None  # [L, Hkv, P, D] KV_DTYPE, when stored
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
    model, prompts: list[torch.Tensor], max_new_tokens: int, *, store_kv: bool = True
) -> list[dict[str, torch.Tensor]]:
    """The tensors of one record per prompt (1-D id tensors): greedy answer, importance, optional prompt K/V.

    The prompts are answered together (left-padded; the attention mask keeps every prompt's
    positions 0..P-1 and hides the padding), which amortises the decoding steps. An answer ends at
    its first EOS, included, as in single-prompt `generate`. Each prompt's K/V is then cut out of
    the batch cache and its target computed on its own.
    """
    device = next(model.parameters()).device
    eos = eos_ids(model)
    pad = model.generation_config.pad_token_id
    pad = next(iter(eos)) if pad is None else pad
    longest = max(int(p.shape[0]) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - prompt.shape[0] :] = prompt
        mask[row, longest - prompt.shape[0] :] = 1
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
    )
    batch_cache = out.past_key_values
    records = []
    for row, prompt in enumerate(prompts):
        answer = _until_eos(out.sequences[row, longest:], eos)
        start = longest - prompt.shape[0]
        cache = DynamicCache()
        for idx, layer in enumerate(batch_cache.layers):
            cache.update(
                layer.keys[row : row + 1, :, start:longest], layer.values[row : row + 1, :, start:longest], idx
            )
        tensors = {"prompt_ids": prompt.cpu(), "answer_ids": answer.cpu()}
        if store_kv:
            tensors["keys"] = torch.stack([layer.keys[0] for layer in cache.layers]).to("cpu", KV_DTYPE)
            tensors["values"] = torch.stack([layer.values[0] for layer in cache.layers]).to("cpu", KV_DTYPE)
        importance = answer_importance(model, cache, answer[None])
        tensors["importance"] = torch.stack([s[0] for s in importance]).float().cpu()
        records.append(tensors)
    return records


def _until_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    for i, token in enumerate(tokens.tolist()):
        if token in eos:
            return tokens[: i + 1]
    return tokens


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
