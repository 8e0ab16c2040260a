"""Training lookahead modules: offline prompt data, teacher answers and targets, the trainer.

    from lookaheadkv_kernels.training import AnswerStore, TeacherSource, Trainer, TrainConfig, encode_samples, make_samples
    samples = make_samples("train", 2000, count_tokens)                               # data.py
    store = AnswerStore(directory / "answers.jsonl")                                  # teacher.py (resumable)
    train = TeacherSource(model, encode_samples(tokenizer, samples), store, max_new_tokens=32)
    Trainer(model, train, val_records, out_dir, TrainConfig()).run()                  # trainer.py (checkpointed)

`lookaheadkv train` runs the whole pipeline; `lookaheadkv_kernels.training.report` measures a module
on the held-out split against the baselines.
"""

from .data import SPLITS, TASKS, Sample, make_samples
from .targets import answer_importance, kept_recall, kl_divergence, normalise, topk_recall
from .teacher import (
    AnswerStore,
    Prompt,
    TeacherRecord,
    TeacherSource,
    build_records,
    encode_samples,
    load_record,
    teach,
)
from .trainer import History, TrainConfig, Trainer, record_loss, target_and_prediction, validate

__all__ = [
    "SPLITS",
    "TASKS",
    "Sample",
    "make_samples",
    "answer_importance",
    "kept_recall",
    "kl_divergence",
    "normalise",
    "topk_recall",
    "AnswerStore",
    "Prompt",
    "TeacherRecord",
    "TeacherSource",
    "encode_samples",
    "build_records",
    "load_record",
    "teach",
    "History",
    "TrainConfig",
    "Trainer",
    "record_loss",
    "target_and_prediction",
    "validate",
]
