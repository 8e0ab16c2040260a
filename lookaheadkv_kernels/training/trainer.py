"""Training a LookaheadModule against teacher records.

Loss of one prompt: KL(true ‖ predicted) averaged over layers and KV heads, where predicted is the
lookahead rows' scores of the prompt keys (`lookahead_stream`, GQA mean — what the LookaheadKV
policy scores with). The base model is frozen; the prompt's K/V come from the record (one prefill
without gradients), so gradients reach only the lookahead embeddings and LoRA, through the lookahead
rows. The first `num_sink` keys (default: the policy's 4 protected sinks) and the last `recent` keys
(default 0) — kept by the LookaheadKV policy whatever their score — are left out, and both
distributions are pooled over the keys between (default avg 5; `pool_kernel` 1 = none; the policy
ranks by smoothed scores too) and renormalised, so the loss spends itself on the ranking the policy uses
(docs/tuning.md). A batch averages the loss of `batch_size` prompts (one at a time: prompts differ in
length).

Prompts are prepared `chunk_prompts` at a time (`TeacherSource.records`: one prefill each) and each
prepared prompt serves `reuse` steps of its chunk, so a prefill is paid once per `reuse` uses.

AdamW with linear warm-up then cosine decay to `final_lr_ratio`, gradient-norm clipping. The order
of the records is a pure function of (seed, step), so a checkpoint (module, optimizer, scheduler,
step, history) resumes to exactly the state an uninterrupted run reaches, mid-chunk included.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..runtime.lookahead import LookaheadModule, lookahead_stream
from ..runtime.policies import DEFAULT_NUM_SINK
from .targets import kl_divergence, normalise, topk_recall
from .teacher import TeacherRecord

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    final_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    n_lookahead: int = 32
    rank: int = 8
    alpha: float = 32.0
    eval_every: int = 25  # steps between validations (and at the end); 0 = only at the end
    checkpoint_every: int = 10  # steps between checkpoints (and at the end)
    budgets: tuple[int, ...] = (64, 128, 256, 512)
    num_sink: int = DEFAULT_NUM_SINK  # leading keys left out of the loss and the validation measures
    recent: int = 0  # trailing keys left out likewise
    # Pooling of target and prediction over the scored keys (1 = none): the shipped module's recipe
    # (docs/tuning.md).
    pool_kernel: int = 5
    pool_type: str = "avg"
    chunk_prompts: int | None = None  # prompts prepared together (default: batch_size)
    reuse: int = 1  # steps of its chunk each prepared prompt serves

    def __post_init__(self):
        if self.chunk_prompts is None:
            self.chunk_prompts = self.batch_size
        for name in ("steps", "batch_size", "n_lookahead", "rank", "chunk_prompts", "reuse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "num_sink", "recent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0 or self.pool_type not in ("avg", "max"):
            raise ValueError(
                f"need an odd pool_kernel >= 1 and pool_type 'avg' or 'max', got {self.pool_kernel!r}, {self.pool_type!r}"
            )
        if not (self.lr > 0 and 0 <= self.final_lr_ratio <= 1 and self.clip_norm > 0):
            raise ValueError("need lr > 0, 0 <= final_lr_ratio <= 1 and clip_norm > 0")
        if self.chunk_prompts * self.reuse % self.batch_size:
            raise ValueError(
                f"chunk_prompts x reuse ({self.chunk_prompts} x {self.reuse}) must be a multiple of batch_size ({self.batch_size})"
            )
        self.budgets = tuple(int(b) for b in self.budgets)

    @property
    def steps_per_chunk(self) -> int:
        return self.chunk_prompts * self.reuse // self.batch_size


def pool(scores: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """scores [..., K] pooled along K (stride 1, padding k//2; an average counts only real keys).

    Applied after the sinks are dropped: pooled in, their large mass would spread onto their
    neighbours.
    """
    if config.pool_kernel == 1:
        return scores
    flat, k = scores.reshape(-1, 1, scores.shape[-1]), config.pool_kernel
    if config.pool_type == "avg":
        pooled = torch.nn.functional.avg_pool1d(flat, k, stride=1, padding=k // 2, count_include_pad=False)
    else:
        pooled = torch.nn.functional.max_pool1d(flat, k, stride=1, padding=k // 2)
    return pooled.reshape(scores.shape)


def distributions(
    importance: torch.Tensor, scores: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, predicted) [..., K] from the true importance and the lookahead scores [..., P]: the
    K = P - num_sink - recent scored keys, pooled per `config`, renormalised."""
    num_prompt = importance.shape[-1]
    if config.num_sink + config.recent >= num_prompt:
        raise ValueError(
            f"num_sink ({config.num_sink}) + recent ({config.recent}) leave no key of a {num_prompt}-token prompt to score"
        )
    keys = slice(config.num_sink, num_prompt - config.recent)
    return normalise(pool(importance[..., keys], config)), normalise(pool(scores[..., keys], config))


def target_and_prediction(model, module: LookaheadModule, record: TeacherRecord, config: TrainConfig, device):
    """`distributions` of a record: its importance and the module's scores [L, Hkv, P] on its prompt K/V."""
    _, scores = lookahead_stream(model, module, record.prompt_kv(device))
    return distributions(record.importance.to(device), torch.stack([s[0] for s in scores]), config)


def record_loss(model, module: LookaheadModule, record: TeacherRecord, config: TrainConfig, device) -> torch.Tensor:
    """Mean over layers and KV heads of KL(record's importance ‖ lookahead prediction)."""
    return kl_divergence(*target_and_prediction(model, module, record, config, device)).mean()


@torch.no_grad()
def validate(
    model, module: LookaheadModule, records: list[TeacherRecord], config: TrainConfig, device
) -> dict[str, float]:
    """Mean KL and recall@budget (of the true top-budget keys among the predicted top-budget keys,
    mean over layers and heads, then over the records with more scored keys than the budget)."""
    kls, recalls = [], {b: [] for b in config.budgets}
    for record in records:
        target, predicted = target_and_prediction(model, module, record, config, device)
        kls.append(float(kl_divergence(target, predicted).mean()))
        for b in config.budgets:
            if b < target.shape[-1]:
                recalls[b].append(float(topk_recall(predicted, target, b).mean()))
    metrics = {"kl": sum(kls) / len(kls)}
    metrics.update({f"recall@{b}": sum(v) / len(v) for b, v in recalls.items() if v})
    return metrics


@lru_cache(maxsize=4)
def _epoch_permutation(num_records: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def record_order(num_records: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Indices of the records of `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    first = step * batch_size
    return [
        _epoch_permutation(num_records, seed, position // num_records)[position % num_records]
        for position in range(first, first + batch_size)
    ]


def step_batch(num_records: int, config: TrainConfig, step: int) -> tuple[int, list[int], list[int]]:
    """(chunk number, the chunk's record indices, the positions in the chunk of `step`'s batch).

    Chunk k is `record_order(..., k, chunk_prompts)`; its steps go through it `reuse` times, the
    first time in order, then in permutations seeded by (seed, k, pass).
    """
    chunk = step // config.steps_per_chunk
    indices = record_order(num_records, config.seed, chunk, config.chunk_prompts)
    positions = []
    for flat in range(
        (step % config.steps_per_chunk) * config.batch_size, (step % config.steps_per_chunk + 1) * config.batch_size
    ):
        rerun, position = divmod(flat, config.chunk_prompts)
        if rerun:
            generator = torch.Generator().manual_seed((config.seed * 100_003 + chunk) * 1_009 + rerun)
            position = int(torch.randperm(config.chunk_prompts, generator=generator)[position])
        positions.append(position)
    return chunk, indices, positions


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.final_lr_ratio + (1 - config.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class History:
    losses: list[float] = field(default_factory=list)  # per step, the batch's mean loss
    validations: list[dict] = field(default_factory=list)  # {"step", "kl", "recall@b", ...}
    seconds: float = 0.0  # training wall time (steps and preparing the prompts), summed over resumed runs
    prepare_seconds: float = 0.0  # of which preparing prompts (prefill, decoding, targets)


class Trainer:
    """Trains a new LookaheadModule (from `config`) on teacher records.

    `train`: a `teacher.TeacherSource` (or anything with `len()` and `records(indices)` returning
    TeacherRecords with their prompt K/V); `val_records`: held-out TeacherRecords with K/V.
    `out_dir` receives the checkpoint, the final module (`out_dir/module`) and `history.json`.
    """

    def __init__(self, model, train, val_records, out_dir, config: TrainConfig, *, device=None, progress=True):
        if not len(train):
            raise ValueError("no training records")
        self.model, self.config, self.progress = model, config, progress
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.train = train
        self.val_records = list(val_records)
        self._chunk: tuple[int, list[TeacherRecord]] | None = None
        self.out_dir = Path(out_dir)
        for p in model.parameters():
            p.requires_grad_(False)
        self.module = LookaheadModule(
            model, n_lookahead=config.n_lookahead, rank=config.rank, alpha=config.alpha, seed=config.seed
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.step = 0
        self.history = History()

    # ---- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> Path:
        state = {
            "config": asdict(self.config),
            "step": self.step,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": asdict(self.history),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", dir=self.out_dir)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.checkpoint_path

    def load_checkpoint(self) -> bool:
        """Restore the checkpoint in out_dir if there is one; False if none."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        saved, current = state["config"], asdict(self.config)
        schedule_free = {"eval_every", "checkpoint_every"}  # the only settings a resumed run may change
        differing = {k: (saved.get(k), v) for k, v in current.items() if k not in schedule_free and saved.get(k) != v}
        if differing:
            raise ValueError(
                f"checkpoint {self.checkpoint_path} was made with other settings (saved, given): {differing}"
            )
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = History(**state["history"])
        return True

    # ---- training -------------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step on the batch of `self.step`; returns its mean loss (before the update)."""
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        chunk, indices, positions = step_batch(len(self.train), self.config, self.step)
        if self._chunk is None or self._chunk[0] != chunk:
            self._chunk = None  # free the previous chunk's K/V first
            start = time.perf_counter()
            self._chunk = (chunk, self.train.records(indices))
            self.history.prepare_seconds += time.perf_counter() - start
        total = 0.0
        for position in positions:
            loss = record_loss(self.model, self.module, self._chunk[1][position], self.config, self.device)
            (loss / len(positions)).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        mean = total / len(positions)
        self.history.losses.append(mean)
        return mean

    def validate(self) -> dict:
        self.module.eval()
        metrics = {"step": self.step, **validate(self.model, self.module, self.val_records, self.config, self.device)}
        self.history.validations.append(metrics)
        return metrics

    def run(self, until: int | None = None) -> LookaheadModule:
        """Train up to step `until` (default config.steps), validating and checkpointing on schedule.

        Reaching config.steps also writes the final module to out_dir/module and history.json.
        """
        until = self.config.steps if until is None else min(until, self.config.steps)
        cfg = self.config
        if self.step == 0 and self.val_records and not self.history.validations:
            self._log(self.validate())
        bar = tqdm(total=until, initial=self.step, desc="train", disable=not self.progress)
        while self.step < until:
            start = time.perf_counter()
            loss = self.train_step()
            self.history.seconds += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            last = self.step == cfg.steps
            if self.val_records and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                self._log(self.validate())
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last or self.step == until:
                self.save_checkpoint()
        bar.close()
        if self.step == cfg.steps:
            self.module.save(self.out_dir / "module")
            (self.out_dir / "history.json").write_text(json.dumps(asdict(self.history), indent=1))
        return self.module

    def _log(self, metrics: dict) -> None:
        if self.progress:
            tqdm.write(
                "validation "
                + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            )
