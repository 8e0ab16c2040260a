"""Training lookahead modules: offline prompt data, teacher answers and targets, the trainer.

    from lookaheadkv_kernels.training import make_samples, build_records, Trainer, TrainConfig
    samples = make_samples("train", 256, count_tokens)                  # data.py
    paths = build_records(model, tokenizer, samples, directory)         # teacher.py (resumable)
    Trainer(model, paths, val_paths, out_dir, TrainConfig()).run()      # trainer.py (checkpointed)

`lookaheadkv train` runs the whole pipeline; `lookaheadkv_kernels.training.report` measures a module
on the held-out split against the baselines.
"""

from .data import SPLITS, TASKS, Sample, make_samples
from .targets import answer_importance, kept_recall, kl_divergence, normalise, topk_recall
from .teacher import TeacherRecord, build_records, load_record, teach
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
    "TeacherRecord",
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
