"""`lookaheadkv train`: generate prompts, teacher answers and targets, then train a lookahead module.

Every stage resumes: teacher answers already on disk (DATA_DIR/answers.jsonl, token ids only) are
reused, and training continues from the checkpoint in --out (unless --fresh). Targets and prompt K/V
are recomputed from the stored answers as training reaches each chunk of prompts. The trained module lands in OUT/module (load it with
`LookaheadModule.load`), with OUT/history.json (losses, validations) and OUT/run.json (the command,
settings, wall times and hardware).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..argtypes import CommandParser, load_errors_reported, model_source, nonnegative_int, positive_int, torch_device
from ..runtime.models import cache_dir, config_hash, load_model
from .data import make_samples
from .teacher import AnswerStore, TeacherSource, encode_samples
from .trainer import TrainConfig, Trainer


def _parser() -> CommandParser:
    defaults = TrainConfig()
    p = CommandParser(prog="lookaheadkv train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=model_source,
        default="smollm2",
        help="'smollm2' (embedded, the default) or a local HF checkpoint directory",
    )
    p.add_argument("--out", required=True, help="run directory: checkpoint, final module, history")
    p.add_argument(
        "--data-dir", help="teacher answers (default: the runtime cache dir, keyed by model and teacher settings)"
    )
    p.add_argument(
        "--device",
        type=torch_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:N] (default: %(default)s)",
    )
    data = p.add_argument_group("data")
    data.add_argument("--train-samples", type=positive_int, default=256, help="training prompts (default: %(default)s)")
    data.add_argument(
        "--val-samples",
        type=nonnegative_int,
        default=16,
        help="held-out prompts for validation during training (default: %(default)s)",
    )
    data.add_argument(
        "--min-tokens", type=positive_int, default=512, help="shortest document, in tokens (default: %(default)s)"
    )
    data.add_argument(
        "--max-tokens", type=positive_int, default=1024, help="longest document, in tokens (default: %(default)s)"
    )
    data.add_argument(
        "--short-max",
        type=positive_int,
        help="draw most documents from [--min-tokens, this] and a --long-share of them log-uniformly "
        "from [this, --max-tokens] (default: all uniform in [--min-tokens, --max-tokens])",
    )
    data.add_argument(
        "--long-share",
        type=float,
        default=0.0,
        help="share of documents longer than --short-max (default: %(default)s)",
    )
    data.add_argument(
        "--answer-tokens",
        type=positive_int,
        default=64,
        help="longest teacher answer, in tokens (default: %(default)s)",
    )
    data.add_argument(
        "--teacher-batch",
        type=positive_int,
        default=8,
        help="prompts decoded together by the teacher (default: %(default)s)",
    )
    data.add_argument(
        "--teacher-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the teacher's prefill and decoding (the prompt K/V the rows attend to in training); "
        "the module always trains in float32 (default: %(default)s)",
    )
    data.add_argument("--data-seed", type=int, default=0, help="seed of the prompts (default: %(default)s)")
    train = p.add_argument_group("training")
    train.add_argument(
        "--steps", type=positive_int, default=defaults.steps, help="optimiser steps (default: %(default)s)"
    )
    train.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="prompts per step (default: %(default)s)"
    )
    train.add_argument(
        "--chunk-prompts",
        type=positive_int,
        help="prompts prefilled together, whose K/V serve --reuse steps each (default: --batch-size)",
    )
    train.add_argument(
        "--reuse",
        type=positive_int,
        default=defaults.reuse,
        help="steps each prefilled prompt serves (default: %(default)s)",
    )
    train.add_argument(
        "--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW) (default: %(default)s)"
    )
    train.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)s)"
    )
    train.add_argument(
        "--warmup-steps",
        type=nonnegative_int,
        default=defaults.warmup_steps,
        help="linear warm-up steps (default: %(default)s)",
    )
    train.add_argument(
        "--clip-norm", type=float, default=defaults.clip_norm, help="gradient norm clip (default: %(default)s)"
    )
    train.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the module initialisation and the record order (default: %(default)s)",
    )
    train.add_argument(
        "--n-lookahead",
        type=positive_int,
        default=defaults.n_lookahead,
        help="lookahead tokens (rows) (default: %(default)s)",
    )
    train.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA rank (default: %(default)s)")
    train.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="LoRA alpha (scale alpha / rank) (default: %(default)s)"
    )
    train.add_argument(
        "--num-sink",
        type=nonnegative_int,
        default=defaults.num_sink,
        help="leading keys left out of the loss (the policy keeps them) (default: %(default)s)",
    )
    train.add_argument(
        "--recent",
        type=nonnegative_int,
        default=defaults.recent,
        help="trailing keys left out of the loss (default: %(default)s)",
    )
    train.add_argument(
        "--pool-kernel",
        type=positive_int,
        default=defaults.pool_kernel,
        help="pool target and prediction over this many keys (odd; 1 = none) (default: %(default)s)",
    )
    train.add_argument(
        "--pool-type",
        choices=("avg", "max"),
        default=defaults.pool_type,
        help="pooling of --pool-kernel (default: %(default)s)",
    )
    train.add_argument(
        "--eval-every",
        type=nonnegative_int,
        default=defaults.eval_every,
        help="steps between validations, 0 = only at the end (default: %(default)s)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=defaults.checkpoint_every,
        help="steps between checkpoints (and at the end) (default: %(default)s)",
    )
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    return p


def parse_args(argv) -> tuple[argparse.Namespace, TrainConfig]:
    """The options and the training settings, checked before any model loads or data is built."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens {args.min_tokens} exceeds --max-tokens {args.max_tokens}")
    if args.short_max is not None and not args.min_tokens <= args.short_max <= args.max_tokens:
        parser.error(f"--short-max {args.short_max} is outside [--min-tokens, --max-tokens]")
    if not 0 <= args.long_share <= 1 or (args.long_share and args.short_max is None):
        parser.error(f"--long-share {args.long_share}: needs --short-max and a value in [0, 1]")
    try:
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            clip_norm=args.clip_norm,
            seed=args.seed,
            n_lookahead=args.n_lookahead,
            rank=args.rank,
            alpha=args.alpha,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            num_sink=args.num_sink,
            recent=args.recent,
            pool_kernel=args.pool_kernel,
            pool_type=args.pool_type,
            chunk_prompts=args.chunk_prompts,
            reuse=args.reuse,
        )
    except ValueError as error:
        parser.error(str(error))
    return args, config


def default_data_dir(model, args) -> Path:
    # Answers are keyed by prompt (key and ids), so one file serves every length recipe.
    recipe = f"answers-ans{args.answer_tokens}-{args.teacher_dtype}"
    return cache_dir() / "training" / config_hash(model.config) / recipe


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, config = parse_args(argv)
    started = time.time()
    with load_errors_reported(_parser(), "--model"):
        model, tokenizer = load_model(args.model, device=args.device)

    def count_tokens(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(model, args)
    lengths = dict(
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        seed=args.data_seed,
        short_max=args.short_max,
        long_share=args.long_share,
    )
    train_samples = make_samples("train", args.train_samples, count_tokens, **lengths)
    val_samples = make_samples("heldout", args.val_samples, count_tokens, **lengths)
    teacher_model = model if args.teacher_dtype == "float32" else copy.deepcopy(model).to(torch.bfloat16)
    store = AnswerStore(data_dir / "answers.jsonl")
    teacher = dict(max_new_tokens=args.answer_tokens, batch_size=args.teacher_batch)
    train = TeacherSource(teacher_model, encode_samples(tokenizer, train_samples), store, **teacher)
    val = TeacherSource(teacher_model, encode_samples(tokenizer, val_samples), store, **teacher)
    print(
        f"{len(train)} training and {len(val)} held-out prompts; {len(store)} teacher answers stored in {store.path}",
        file=sys.stderr,
    )
    val_records = val.records(list(range(len(val))))
    teacher_done = time.time()

    trainer = Trainer(model, train, val_records, args.out, config, device=args.device)
    if not args.fresh and trainer.load_checkpoint():
        print(f"resuming from {trainer.checkpoint_path} at step {trainer.step}", file=sys.stderr)
    trainer.run()

    run = {
        "command": "lookaheadkv train " + shlex.join(argv),
        "settings": vars(args),
        "train_config": asdict(config),
        "data_dir": str(data_dir),
        "validation_prompts_seconds_this_invocation": round(teacher_done - started, 1),
        "train_seconds_total": round(trainer.history.seconds, 1),
        "prepare_seconds_total": round(trainer.history.prepare_seconds, 1),
        "prompt_tokens": {
            "train_mean": round(sum(p.ids.shape[0] for p in train.prompts) / len(train), 1),
            "train_max": max(p.ids.shape[0] for p in train.prompts),
        },
        "final_validation": trainer.history.validations[-1] if trainer.history.validations else None,
        "hardware": {
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "torch": torch.__version__,
        },
    }
    Path(args.out, "run.json").write_text(json.dumps(run, indent=1, default=str))
    print(f"module written to {Path(args.out, 'module')}")
    return 0
