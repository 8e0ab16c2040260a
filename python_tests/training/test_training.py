"""Training pipeline on a tiny random Llama: targets, gradients, frozen base, checkpoint/resume, data."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DynamicCache,  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
)

from lookaheadkv_kernels.runtime.lookahead import lookahead_stream  # noqa: E402
from lookaheadkv_kernels.training import (  # noqa: E402
    TASKS,
    TrainConfig,
    Trainer,
    kl_divergence,
    load_record,
    make_samples,
    normalise,
    record_loss,
    target_and_prediction,
    teach,
    topk_recall,
)
from lookaheadkv_kernels.training import data as data_module  # noqa: E402
from lookaheadkv_kernels.training.targets import answer_importance  # noqa: E402
from lookaheadkv_kernels.training.teacher import (  # noqa: E402
    AnswerStore,
    Prompt,
    TeacherSource,
    build_records,
    greedy_answers,
    record_text,
    write_record,
)
from lookaheadkv_kernels.training.trainer import step_batch  # noqa: E402

VOCAB = 96


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=0,
        attn_implementation="eager",
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 1
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=generator) for n in lengths]


@pytest.fixture(scope="module")
def records(model, tmp_path_factory):
    """Six training records and two validation records of random prompts, on disk."""
    directory = tmp_path_factory.mktemp("records")
    prompts = random_prompts([40, 33, 47, 29, 52, 36, 44, 31])
    paths = []
    for i, tensors in enumerate(teach(model, prompts, 6)):
        paths.append(write_record(directory / f"r{i}.safetensors", tensors, key=f"r{i}", task="random"))
    return paths[:6], paths[6:]


def test_target_equals_eager_attention_of_the_answer(model):
    prompt = random_prompts([30], seed=3)[0]
    record = teach(model, [prompt], 7)[0]
    answer = record["answer_ids"]
    assert answer.numel() >= 1
    full = torch.cat([prompt, answer])[None]
    with torch.no_grad():
        attentions = model(input_ids=full, output_attentions=True).attentions  # eager: [1, Hq, T, T] per layer
    num_prompt, group = prompt.numel(), model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, probs in enumerate(attentions):
        answer_rows = probs[0, :, num_prompt:, :num_prompt].double().mean(dim=1)  # [Hq, P]: mean over answer tokens
        expected = normalise(answer_rows.view(-1, group, num_prompt).mean(dim=1))  # GQA mean, sum 1 over the prompt
        torch.testing.assert_close(record["importance"][layer].double(), expected, atol=2e-6, rtol=1e-4)


def test_batched_teacher_matches_single_prompts(model):
    prompts = random_prompts([25, 41, 33], seed=5)
    batched = teach(model, prompts, 8)
    for prompt, together in zip(prompts, batched):
        alone = teach(model, [prompt], 8)[0]
        assert torch.equal(together["answer_ids"], alone["answer_ids"])
        assert torch.equal(together["prompt_ids"], prompt)
        torch.testing.assert_close(together["keys"].float(), alone["keys"].float(), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(together["importance"], alone["importance"], atol=1e-5, rtol=1e-4)


def test_answer_importance_rows_sum_to_one(model):
    prompt = random_prompts([20], seed=7)[0][None]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    importance = answer_importance(model, cache, torch.tensor([[5, 6, 7]]))
    assert len(importance) == model.config.num_hidden_layers
    for scores in importance:
        assert scores.shape == (1, model.config.num_key_value_heads, 20)
        torch.testing.assert_close(scores.sum(-1), torch.ones(1, model.config.num_key_value_heads))


def make_trainer(model, records, out_dir, **overrides):
    settings = dict(
        steps=4,
        batch_size=3,
        lr=5e-3,
        warmup_steps=1,
        n_lookahead=4,
        rank=2,
        eval_every=2,
        checkpoint_every=0,
        budgets=(8, 16),
    )
    settings.update(overrides)
    return Trainer(
        model,
        stored_source(model, records[0], out_dir / "answers.jsonl"),
        [load_record(p) for p in records[1]],
        out_dir,
        TrainConfig(**settings),
        progress=False,
    )


def stored_source(model, paths, store_path):
    """A TeacherSource over the records' prompts whose answers are already stored (nothing decoded)."""
    loaded = [load_record(p) for p in paths]
    store = AnswerStore(store_path)
    for r in loaded:
        store.add(r.key, r.prompt_ids, r.answer_ids)
    prompts = [Prompt(r.key, r.task, r.prompt_ids) for r in loaded]
    return TeacherSource(model, prompts, store, max_new_tokens=6, batch_size=4)


def test_one_step_lowers_the_loss_on_a_fixed_batch(model, records, tmp_path):
    trainer = make_trainer(model, records, tmp_path, steps=1, batch_size=6, lr=1e-3, warmup_steps=0)
    batch = [load_record(p) for p in records[0]]

    def batch_loss():
        with torch.no_grad():
            return sum(float(record_loss(model, trainer.module, r, trainer.config, "cpu")) for r in batch) / len(batch)

    before = batch_loss()
    reported = trainer.train_step()  # batch_size = all six records: the step's batch is this fixed batch
    assert reported == pytest.approx(before, rel=1e-5)
    assert batch_loss() < before


def test_only_lookahead_parameters_get_gradients(model, records, tmp_path):
    trainer = make_trainer(model, records, tmp_path)
    loss = record_loss(model, trainer.module, load_record(records[0][0]), trainer.config, "cpu")
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    grads = {name: p.grad for name, p in trainer.module.named_parameters()}
    # Nothing scored depends on the last layer's lookahead values or anything after its attention.
    last = model.config.num_hidden_layers - 1
    unused = {f"lora.{last}.{t}_{ab}" for t in ("v", "o", "gate", "up", "down") for ab in "ab"}
    assert all(grads[name] is None or not grads[name].any() for name in unused)
    used = {name: g for name, g in grads.items() if name not in unused}
    assert all(g is not None for g in used.values())
    assert used["embeddings"].abs().sum() > 0
    # LoRA B starts at zero, so the first gradient reaches every B (A's gradient is B-weighted: zero).
    assert all(g.abs().sum() > 0 for name, g in used.items() if name.endswith("_b"))


def test_base_weights_bit_identical_after_training(model, records, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_trainer(model, records, tmp_path).run()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "module" / "lookahead.safetensors").is_file()
    assert (tmp_path / "history.json").is_file()


@pytest.mark.parametrize("chunking", [{}, dict(chunk_prompts=6, reuse=2)], ids=["chunk=batch", "chunk6-reuse2"])
def test_checkpoint_resume_equals_uninterrupted_run(model, records, tmp_path, chunking):
    straight = make_trainer(model, records, tmp_path / "straight", **chunking)
    straight.run()

    first = make_trainer(model, records, tmp_path / "resumed", **chunking)
    first.run(until=1)  # interrupted after step 1 (mid-chunk with chunk6-reuse2); run() checkpoints where it stops
    resumed = make_trainer(model, records, tmp_path / "resumed", **chunking)
    assert resumed.load_checkpoint() and resumed.step == 1
    resumed.run()

    for (name, a), (_, b) in zip(straight.module.state_dict().items(), resumed.module.state_dict().items()):
        assert torch.equal(a, b), name
    assert straight.history.losses == resumed.history.losses
    assert [v for v in straight.history.validations] == [v for v in resumed.history.validations]
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_resume_refuses_other_settings(model, records, tmp_path):
    make_trainer(model, records, tmp_path).run(until=1)
    other = make_trainer(model, records, tmp_path, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        other.load_checkpoint()


def test_loss_leaves_out_the_kept_sink_and_recent_keys(model, records, tmp_path):
    trainer = make_trainer(model, records, tmp_path, num_sink=2, recent=3, pool_kernel=1)
    record = load_record(records[0][0])
    with torch.no_grad():
        target, predicted = target_and_prediction(model, trainer.module, record, trainer.config, "cpu")
        _, scores = lookahead_stream(model, trainer.module, record.prompt_kv("cpu"))
        loss = record_loss(model, trainer.module, record, trainer.config, "cpu")
    inner = slice(2, record.num_prompt - 3)
    expected_target = record.importance[..., inner] / record.importance[..., inner].sum(-1, keepdim=True)
    full = torch.stack([s[0] for s in scores])[..., inner]
    torch.testing.assert_close(target, expected_target)
    torch.testing.assert_close(predicted, full / full.sum(-1, keepdim=True))
    torch.testing.assert_close(loss, kl_divergence(expected_target, predicted).mean())


@pytest.mark.parametrize("pool_type", ["avg", "max"])
def test_pooled_loss_pools_the_keys_between_sinks_and_recent(model, records, tmp_path, pool_type):
    """pool_kernel 5: both distributions are the scored keys' scores pooled (an average over the real
    keys in the window only), then renormalised."""
    trainer = make_trainer(model, records, tmp_path, num_sink=2, recent=1, pool_kernel=5, pool_type=pool_type)
    record = load_record(records[0][0])
    with torch.no_grad():
        target, predicted = target_and_prediction(model, trainer.module, record, trainer.config, "cpu")
        _, scores = lookahead_stream(model, trainer.module, record.prompt_kv("cpu"))

    def expected(x):
        x = x[..., 2 : record.num_prompt - 1].double()
        padded = torch.nn.functional.pad(x, (2, 2), value=float("nan"))
        windows = padded.unfold(-1, 5, 1)  # [..., K, 5]; NaN marks the padding
        pooled = windows.nanmean(-1) if pool_type == "avg" else windows.nan_to_num(float("-inf")).amax(-1)
        return (pooled / pooled.sum(-1, keepdim=True)).float()

    torch.testing.assert_close(predicted, expected(torch.stack([s[0] for s in scores])))
    torch.testing.assert_close(target, expected(record.importance))


def test_loss_refuses_settings_that_leave_no_key(model, records, tmp_path):
    record = load_record(records[0][0])
    trainer = make_trainer(model, records, tmp_path, num_sink=record.num_prompt - 2, recent=2)
    with pytest.raises(ValueError, match="num_sink"):
        record_loss(model, trainer.module, record, trainer.config, "cpu")


def test_checkpoint_without_a_setting_is_refused(model, records, tmp_path):
    make_trainer(model, records, tmp_path).run(until=1)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["pool_kernel"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="pool_kernel"):
        make_trainer(model, records, tmp_path).load_checkpoint()


def test_validation_reports_kl_and_recall(model, records, tmp_path):
    metrics = make_trainer(model, records, tmp_path).validate()
    assert metrics["step"] == 0 and metrics["kl"] >= 0
    assert 0 <= metrics["recall@8"] <= 1 and 0 <= metrics["recall@16"] <= 1


def test_kl_and_recall_measures():
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert float(kl_divergence(target, target)) == pytest.approx(0.0)
    assert float(kl_divergence(target, torch.full((1, 4), 0.25))) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert float(topk_recall(torch.tensor([[0.0, 0.9, 0.1, 0.0]]), target, 2)) == 0.5
    assert float(topk_recall(torch.tensor([[0.3, 0.3, 0.2, 0.2]]), target, 2)) == 1.0


# ---- data ------------------------------------------------------------------------------------


def words(text):
    return len(text.split())


def test_samples_are_deterministic_and_cover_every_task():
    a = make_samples("train", 14, words, min_tokens=60, max_tokens=120, seed=1)
    b = make_samples("train", 14, words, min_tokens=60, max_tokens=120, seed=1)
    assert a == b
    assert {s.task for s in a} == set(TASKS)
    for s in a:
        assert words(s.prompt) >= 60 * 0.8


def test_splits_share_no_passages_and_differ():
    train = set(data_module.verses("train"))
    heldout = set(data_module.verses("heldout"))
    assert train and heldout and not train & heldout
    a = make_samples("train", 7, words, min_tokens=50, max_tokens=80)
    b = make_samples("heldout", 7, words, min_tokens=50, max_tokens=80)
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    passage_tasks = [s for s in b if s.task.startswith("passage")]
    body_lines = {line for s in passage_tasks for line in s.prompt.splitlines()}
    assert not body_lines & train


def test_training_text_is_not_the_evaluation_text():
    assert data_module.TRAIN_TEXT.name == "kjv_train.txt.gz"
    with gzip.open(data_module.TRAIN_TEXT, "rt") as f:
        assert f.readline().startswith("In the beginning God created")


# ---- held-out report ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy_name", ["snapkv", "pyramidkv", "streamingllm", "laq", "lookaheadkv"])
def test_report_replay_keeps_what_the_evicting_prefill_keeps(model, policy_name):
    from lookaheadkv_kernels.runtime import LookaheadModule, make_policy, prefill_and_evict
    from lookaheadkv_kernels.training.report import kept_positions, record_prefill

    options = {"module": LookaheadModule(model, n_lookahead=4, rank=2)} if policy_name == "lookaheadkv" else {}
    policy = (
        make_policy(policy_name, window=8, **options)
        if policy_name in ("snapkv", "pyramidkv")
        else make_policy(policy_name, **options)
    )
    ids = random_prompts([60], seed=11)[0][None]
    expected = prefill_and_evict(model, ids, policy, 44).kept
    layers, next_logits = record_prefill(model, ids)
    replayed = kept_positions(model, layers, next_logits, policy, 44, 60)
    assert len(replayed) == len(expected)
    for a, b in zip(replayed, expected):
        assert torch.equal(a, b)


# ---- command line ------------------------------------------------------------------------------


def tiny_model_with_smollm2_tokenizer():
    """A tiny random Llama over SmolLM2's tokenizer (the test is skipped without the tokenizer)."""
    from transformers import AutoTokenizer

    from lookaheadkv_kernels.runtime.models import smollm2_checkpoint

    try:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint(), local_files_only=True)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model = tiny_model()
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def test_teacher_records_are_reused_only_for_the_same_prompt(tmp_path):
    model, tokenizer = tiny_model_with_smollm2_tokenizer()
    samples = make_samples("train", 2, words, min_tokens=30, max_tokens=40)
    paths = build_records(model, tokenizer, samples, tmp_path, max_new_tokens=2, progress=False)
    written = [p.stat().st_mtime_ns for p in paths]
    assert build_records(model, tokenizer, samples, tmp_path, max_new_tokens=2, progress=False) == paths
    assert [p.stat().st_mtime_ns for p in paths] == written  # same prompts: nothing answered again
    # Same split, index and task (so the same file name) but a different prompt, as after a change
    # of the data generator: that record is answered again, the other one is kept.
    changed = dataclasses.replace(samples[0], prompt=samples[0].prompt + " Answer in one word.")
    build_records(model, tokenizer, [changed, samples[1]], tmp_path, max_new_tokens=2, progress=False)
    assert record_text(paths[0])["prompt"] == changed.prompt
    assert paths[1].stat().st_mtime_ns == written[1]


def test_train_command_end_to_end(tmp_path, monkeypatch):
    """`lookaheadkv train` on a tiny random Llama that uses SmolLM2's tokenizer (skipped without it)."""
    from lookaheadkv_kernels.cli import main

    model, tokenizer = tiny_model_with_smollm2_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("LOOKAHEADKV_CACHE", str(tmp_path / "cache"))
    args = [
        "train",
        "--model",
        str(tmp_path / "tiny"),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--train-samples",
        "3",
        "--val-samples",
        "1",
        "--min-tokens",
        "40",
        "--max-tokens",
        "60",
        "--answer-tokens",
        "3",
        "--teacher-batch",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--n-lookahead",
        "4",
        "--rank",
        "2",
    ]
    assert main(args) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["command"].startswith("lookaheadkv train --model")
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["losses"]) == 2
    assert (tmp_path / "run" / "module" / "lookahead_config.json").is_file()
    [answers] = (tmp_path / "cache" / "training").rglob("answers.jsonl")
    assert len(answers.read_text().splitlines()) == 4  # 3 training + 1 held-out, decoded once, kept for a resumed run
    assert main(args) == 0  # everything reused: the checkpoint is at the last step already
    assert len(answers.read_text().splitlines()) == 4


def test_report_scores_a_module_on_the_saved_prompt_kv(model):
    from lookaheadkv_kernels.runtime import LookaheadModule, prefill_and_evict
    from lookaheadkv_kernels.runtime.policies import LookaheadKV
    from lookaheadkv_kernels.training.report import kept_positions, kv_only_inputs, record_prefill

    # The module alone, as the report scores it: saved K/V carry no hidden rows for window votes.
    policy = LookaheadKV(LookaheadModule(model, n_lookahead=4, rank=2, seed=3), window_votes=0)
    ids = random_prompts([50], seed=13)[0][None]
    expected = prefill_and_evict(model, ids, policy, 20).kept
    layers, _ = record_prefill(model, ids)
    keys, values = torch.stack([x.keys for x in layers]), torch.stack([x.values for x in layers])
    replayed = kept_positions(model, kv_only_inputs(model, keys, values), None, policy, 20, 50)
    assert all(torch.equal(a, b) for a, b in zip(replayed, expected))


def test_report_rows_resume_and_summarise(model, records, tmp_path):
    from lookaheadkv_kernels.runtime import LookaheadModule
    from lookaheadkv_kernels.runtime.policies import SnapKV
    from lookaheadkv_kernels.training.report import evaluate, markdown, summarise

    paths = records[0][:2]
    policies = {"snapkv": SnapKV(window=4)}
    first = evaluate(model, paths, policies, {}, (8, 16), tmp_path, progress=False)
    modules = {"lookaheadkv": LookaheadModule(model, n_lookahead=4, rank=2)}
    second = evaluate(model, paths, policies, modules, (8, 16), tmp_path, progress=False)  # baselines from the cache
    for a, b in zip(first, second):
        assert a["recall"]["snapkv"] == b["recall"]["snapkv"]
        assert set(b["recall"]) == {"snapkv", "lookaheadkv", "lookaheadkv-as-trained"} and b["kl"]["lookaheadkv"] >= 0
    recall, kl = summarise(second, (8, 16))
    assert all(0 <= v <= 1 for per_budget in recall.values() for v in per_budget.values())
    for row in second:
        row["length_target"] = 64
    text = markdown(recall, kl, second, (8, 16), {"lengths": [64], "answer_tokens": 6, "command": "test"})
    assert "| lookaheadkv |" in text and "recall@16" in text


def test_report_kl_is_the_training_loss(model, records, tmp_path):
    """The report's KL is what the trainer minimises by default (4 sinks left out, avg-pooled over 5), on the same record."""
    from lookaheadkv_kernels.runtime import LookaheadModule
    from lookaheadkv_kernels.training.report import evaluate

    module = LookaheadModule(model, n_lookahead=4, rank=2, seed=3)
    torch.nn.init.normal_(module.lora_pair(0, "q")[1], std=0.05)  # a non-trivial module (LoRA B starts at 0)
    [row] = evaluate(model, records[0][:1], {}, {"lookaheadkv": module}, (8,), tmp_path, progress=False)
    with torch.no_grad():
        loss = record_loss(model, module, load_record(records[0][0]), TrainConfig(), "cpu")
    # The report scores on its own prefill, the trainer on the record's K/V: both float32 here.
    assert row["kl"]["lookaheadkv"] == pytest.approx(float(loss), rel=2e-3)


def test_stored_answers_give_the_decoded_records(model):
    prompts = random_prompts([25, 41, 33], seed=9)
    decoded = teach(model, prompts, 8)
    stored = teach(model, prompts, 8, answers=[decoded[0]["answer_ids"], None, decoded[2]["answer_ids"]])
    for a, b in zip(decoded, stored):
        assert torch.equal(a["answer_ids"], b["answer_ids"])
        torch.testing.assert_close(a["importance"], b["importance"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a["keys"], b["keys"])


def test_greedy_answers_leave_the_prompt_caches_untouched(model):
    prompts = random_prompts([12, 19], seed=11)
    caches, first = [], []
    with torch.no_grad():
        for prompt in prompts:
            cache = DynamicCache()
            first.append(model(input_ids=prompt[None], past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            caches.append(cache)
        answers = greedy_answers(model, caches, torch.stack(first), 5)
    assert [c.get_seq_length() for c in caches] == [12, 19]
    for prompt, answer in zip(prompts, answers):  # each equals HF's own greedy decoding of the prompt alone
        with torch.no_grad():
            expected = model.generate(input_ids=prompt[None], max_new_tokens=5, do_sample=False)[0, prompt.numel() :]
        assert torch.equal(answer, expected)


def test_answer_store_keys_answers_by_prompt_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    store = AnswerStore(path)
    prompt = torch.tensor([5, 6, 7])
    store.add("a", prompt, torch.tensor([9, 1]))
    with path.open("a") as f:
        f.write('{"key": "b", "prompt_sha')  # an interrupted append
    reopened = AnswerStore(path)
    assert len(reopened) == 1
    assert torch.equal(reopened.get("a", prompt), torch.tensor([9, 1]))
    assert reopened.get("a", torch.tensor([5, 6, 8])) is None  # another prompt under the same key
    assert reopened.get("b", prompt) is None


def test_teacher_source_decodes_each_prompt_once(model, tmp_path, monkeypatch):
    from lookaheadkv_kernels.training import teacher as teacher_module

    calls = []
    real = teacher_module.greedy_answers
    monkeypatch.setattr(teacher_module, "greedy_answers", lambda m, c, *a: calls.append(len(c)) or real(m, c, *a))
    prompts = [Prompt(f"p{i}", "random", ids) for i, ids in enumerate(random_prompts([20, 31, 26], seed=4))]
    source = TeacherSource(model, prompts, AnswerStore(tmp_path / "a.jsonl"), max_new_tokens=4, batch_size=2)
    first = source.records([2, 0])
    assert [r.key for r in first] == ["p2", "p0"] and sum(calls) == 2
    again = TeacherSource(model, prompts, AnswerStore(tmp_path / "a.jsonl"), max_new_tokens=4, batch_size=2)
    second = again.records([0, 1, 2])
    assert sum(calls) == 3  # only p1 was decoded; p0 and p2 came from the file
    assert torch.equal(second[0].answer_ids, first[1].answer_ids)
    torch.testing.assert_close(second[2].importance, first[0].importance)


def test_chunks_serve_reuse_steps_and_are_prepared_once(model, records, tmp_path):
    config = TrainConfig(steps=8, batch_size=3, chunk_prompts=6, reuse=2, n_lookahead=4, rank=2)
    assert config.steps_per_chunk == 4
    for chunk in range(2):
        batches = [step_batch(6, config, step) for step in range(4 * chunk, 4 * chunk + 4)]
        assert {b[0] for b in batches} == {chunk} and all(b[1] == batches[0][1] for b in batches)
        used = sorted(p for b in batches for p in b[2])
        assert used == sorted(list(range(6)) * 2)  # every prompt of the chunk serves exactly `reuse` steps
    trainer = make_trainer(model, records, tmp_path, steps=8, batch_size=3, chunk_prompts=6, reuse=2, eval_every=0)
    prepared = []
    records_of = trainer.train.records
    trainer.train.records = lambda indices: prepared.append(list(indices)) or records_of(indices)
    trainer.run()
    assert len(prepared) == 2 and all(sorted(p) == list(range(6)) for p in prepared)


def test_chunking_must_fill_whole_batches():
    with pytest.raises(ValueError, match="chunk_prompts"):
        TrainConfig(batch_size=4, chunk_prompts=6, reuse=1)


def test_length_mix_draws_short_and_long_documents():
    lengths = [
        s.target_tokens
        for s in make_samples("train", 200, words, min_tokens=100, max_tokens=800, short_max=150, long_share=0.25)
    ]
    assert all(100 <= n <= 800 for n in lengths)
    assert 0.15 < sum(n > 150 for n in lengths) / len(lengths) < 0.35
    with pytest.raises(ValueError, match="short_max"):
        make_samples("train", 1, words, min_tokens=100, max_tokens=800, short_max=900)


@pytest.mark.parametrize(
    "bad", [dict(num_sink=-1), dict(recent=-2), dict(pool_kernel=4), dict(pool_kernel=0), dict(pool_type="median")]
)
def test_config_rejects_bad_loss_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        TrainConfig(**bad)


def test_report_curves_pair_each_validation_with_the_loss_since_the_last():
    from lookaheadkv_kernels.training.report import curves

    history = {
        "losses": [0.5, 0.3, 0.2, 0.1],
        "validations": [
            {"step": 0, "kl": 0.4, "recall@64": 0.6},
            {"step": 2, "kl": 0.3, "recall@64": 0.7},
            {"step": 4, "kl": 0.25, "recall@64": 0.75},
        ],
    }
    lines = curves(history, prompts_per_step=8).splitlines()
    assert lines[0].startswith("| step | prompts seen |") and "held-out recall@64" in lines[0]
    assert lines[2] == "| 0 | 0 | – | 0.4000 | 0.600 |"
    assert lines[3] == "| 2 | 16 | 0.4000 | 0.3000 | 0.700 |"
    assert lines[4] == "| 4 | 32 | 0.1500 | 0.2500 | 0.750 |"
