"""Evaluation suite: task generation, scoring, the prefill-once replay, kvpress peers, the resumable
harness and its report — on a word-level toy tokenizer and a random tiny Llama (seconds, no SmolLM2)."""

import json
import re
import warnings
from collections import Counter

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from runtime_testing import trained_looking  # noqa: E402

from lookaheadkv_kernels.evaluation import harness, report, tasks  # noqa: E402
from lookaheadkv_kernels.evaluation.replay import capture_prefill, decode, evict  # noqa: E402
from lookaheadkv_kernels.runtime import (  # noqa: E402
    LAQ,
    LookaheadKV,
    Oracle,
    PyramidKV,
    SnapKV,
    SpecKV,
    StreamingLLM,
    generate,
    prefill_and_evict,
)

VOCAB = 96
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level: every word or punctuation mark is one token; unknown words share one id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({str(d): 3 + d for d in range(10)})
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed=0):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


# ---- tasks and scoring ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", tasks.TASKS)
def test_samples_are_deterministic_fitted_and_answerable(tokenizer, task):
    sample = tasks.make_sample(task, 512, 0, tokenizer)
    assert sample == tasks.make_sample(task, 512, 0, tokenizer)
    assert sample != tasks.make_sample(task, 512, 1, tokenizer)
    assert sample != tasks.make_sample(task, 512, 0, tokenizer, seed=7)
    length = len(tasks.prompt_ids(sample, tokenizer))
    limit = 512 - sample.max_new_tokens
    assert 0.8 * limit < length <= limit  # as much filler as fits
    assert sample.answers and all(answer in sample.context for answer in sample.answers)
    assert tasks.prompt_text(sample, tokenizer).endswith("<|im_start|>assistant\n" + sample.answer_prefix)


def test_samples_differ_between_lengths_and_have_their_needles(tokenizer):
    short, long = (tasks.make_sample("niah_multikey", n, 0, tokenizer) for n in (384, 768))
    assert short.answers != long.answers
    assert long.context.count("One of the special magic numbers for") == 4  # the target and 3 distractor keys
    multivalue = tasks.make_sample("niah_multivalue", 384, 0, tokenizer)
    assert len(set(multivalue.answers)) == 4 and multivalue.question.startswith("What are all")


def test_word_tasks_answer_with_the_most_frequent_words(tokenizer):
    common = tasks.make_sample("common_words", 1024, 0, tokenizer)
    counts = Counter(re.findall(r"\d+\. (\w+)", common.context))
    top = {word for word, _ in counts.most_common(10)}
    assert top == set(common.answers) and counts.most_common(11)[10][1] < counts.most_common(10)[9][1]
    frequent = tasks.make_sample("frequent_words", 1024, 0, tokenizer)
    words = Counter(frequent.context.splitlines()[-1].split())
    ranked = words.most_common(4)
    assert [w for w, _ in ranked[:3]] == list(frequent.answers) and ranked[2][1] > ranked[3][1]


def test_variable_tracking_chain_resolves_to_the_value(tokenizer):
    sample = tasks.make_sample("variable_tracking", 512, 0, tokenizer)
    value = re.search(r"the value (\d+)", sample.question).group(1)
    assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", sample.context))

    def resolve(name):
        target = assignments[name]
        return resolve(target[4:]) if target.startswith("VAR ") else target

    assert sorted(n for n in assignments if resolve(n) == value) == sorted(sample.answers)


def test_unknown_task_and_short_length_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample("summarise", 512, 0, tokenizer)
    with pytest.raises(ValueError, match="length"):
        tasks.make_sample("niah_single", 100, 0, tokenizer)


def test_score_is_recall_of_the_references():
    assert tasks.score(" 8207650.", ("8207650",)) == 1.0
    assert tasks.score("The number is 820765", ("8207650",)) == 0.0
    assert tasks.score("Alpha, beta and GAMMA", ("alpha", "gamma", "delta", "beta")) == 0.75
    assert tasks.score("", ("x",)) == 0.0
    with pytest.raises(ValueError):
        tasks.score("x", ())


# ---- the prefill-once replay -----------------------------------------------------------------------


def test_replay_equals_prefill_and_evict_for_every_policy_kind():
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 80), generator=torch.Generator().manual_seed(1))
    prefill = capture_prefill(model, ids)
    continuation = decode(model, prefill, prefill.full_cache(), 40)
    policies = [
        SnapKV(window=8),
        PyramidKV(window=8),
        StreamingLLM(),
        LAQ(snap_window=8),
        SpecKV(num_draft=6, window=8),
        Oracle(max_answer_tokens=5),
        LookaheadKV(trained_looking(model)),
    ]
    for policy in policies:
        for known in (None, continuation):
            replay = evict(model, prefill, policy, 24, max_new_tokens=5, continuation=known)
            reference = prefill_and_evict(model, ids, policy, 24, max_new_tokens=5)
            assert replay.cache.stored_lengths() == reference.cache.stored_lengths(), policy
            for a, b in zip(replay.cache.layers, reference.cache.layers):
                torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
            assert replay.kept_bytes == replay.cache.nbytes() and replay.seconds >= 0
    for layer in prefill.cache.layers:  # the captured prefill is never modified
        assert layer.keys.shape[2] == 80


def test_decoding_a_replayed_cache_equals_generate():
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 60), generator=torch.Generator().manual_seed(2))
    prefill = capture_prefill(model, ids)
    for policy, budget in ((SnapKV(window=8), 20), (StreamingLLM(), 16), (SnapKV(), 100)):
        tokens = decode(model, prefill, evict(model, prefill, policy, budget).cache, 8)[0].tolist()
        assert tokens == generate(model, None, ids, policy=policy, budget=budget, max_new_tokens=8).token_ids


def test_kvpress_peer_equals_kvpress_own_prefill():
    pytest.importorskip("kvpress")
    from lookaheadkv_kernels.evaluation.kvpress_peers import PRESSES, make_press, press_evict

    model = tiny_llama()
    module = trained_looking(model)
    ids = torch.randint(3, VOCAB, (1, 120), generator=torch.Generator().manual_seed(3))
    prefill = capture_prefill(model, ids)
    budget = 40
    for name in PRESSES:
        ours = press_evict(model, prefill, name, budget, module=module)
        press = make_press(name, (120 - budget - 0.5) / 120, module)
        cache = transformers.DynamicCache()
        with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        for a, b in zip(ours.cache.layers, cache.layers):
            assert a.keys.shape[2] == budget
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
        assert ours.cache.get_seq_length() == 120  # decoding continues at the true position


# ---- harness and report ------------------------------------------------------------------------------


def test_evaluation_resumes_and_reports(tmp_path, tokenizer):
    model = tiny_llama()
    samples = [tasks.make_sample(t, 300, 0, tokenizer) for t in ("niah_single", "variable_tracking")]
    policies, budgets = ["full", "snapkv", "streamingllm"], [40, 64]
    store = harness.ResultStore(tmp_path / "eval_t.jsonl")
    harness.evaluate(model, tokenizer, samples, policies, budgets, store, progress=False)
    lines = (tmp_path / "eval_t.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (1 + 2 * 2)
    record = json.loads(lines[1])
    assert {"uid", "policy", "budget", "score", "prediction", "evict_seconds", "kept_bytes", "full_bytes"} <= set(
        record
    )

    resumed = harness.ResultStore(tmp_path / "eval_t.jsonl")
    assert len(resumed.records) == len(lines)
    harness.evaluate(model, tokenizer, samples, policies, budgets + [128], resumed, progress=False)
    assert len((tmp_path / "eval_t.jsonl").read_text().splitlines()) == len(lines) + 2 * 2  # only the new budget

    runs = [
        {"command": "lookaheadkv eval --budgets 40,64", "module": None},
        {"command": "lookaheadkv eval --budgets 128", "module": None},
    ]
    (tmp_path / "eval_t.meta.json").write_text(json.dumps({"runs": runs}))
    written = report.write_report(
        resumed,
        tmp_path,
        "t",
        budgets=budgets,
        policies=policies,
        lengths=[300],
        tasks=["niah_single", "variable_tracking"],
    )
    names = {p.name for p in written}
    assert {"eval_t.csv", "eval_t.md"} <= names
    markdown = (tmp_path / "eval_t.md").read_text()
    assert "| full cache |" in markdown and "| snapkv |" in markdown
    assert (
        "`lookaheadkv eval --budgets 40,64`" in markdown and "`lookaheadkv eval --budgets 128`" in markdown
    )  # every run named
    rows = (tmp_path / "eval_t.csv").read_text().splitlines()
    assert (
        rows[0].startswith("policy,budget,length,task") and len(rows) == 1 + 5 * 3
    )  # (policy, budget) x (2 tasks + mean)


def test_first_sample_chooses_the_sample_indices(tmp_path, tokenizer, monkeypatch):
    from lookaheadkv_kernels.runtime import models

    monkeypatch.setattr(models, "load_model", lambda name: (tiny_llama(), tokenizer))
    args = [
        "--tasks",
        "niah_single",
        "--lengths",
        "300",
        "--policies",
        "full",
        "--budgets",
        "40",
        "--out",
        str(tmp_path),
        "--name",
        "t",
        "--no-progress",
    ]
    assert harness.main(args + ["--samples", "2", "--first-sample", "3"]) == 0
    records = [json.loads(line) for line in (tmp_path / "eval_t.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [3, 4]
    for bad in (["--first-sample", "-1"], ["--samples", "0"]):  # usage errors (python_tests/test_cli.py)
        with pytest.raises(SystemExit):
            harness.main(args + bad)


def test_cli_lists_the_evaluation_commands():
    from lookaheadkv_kernels.cli import COMMANDS

    assert {"eval", "bench-evict", "demo"} <= set(COMMANDS)
    with pytest.raises(ValueError, match="unknown policies"):
        harness.parse_policies("snapkv,h2o")


def test_evaluation_policy_names_derive_from_the_runtime_registry():
    from lookaheadkv_kernels.evaluation.policies import ALL_POLICIES, CONTROLS, FULL, MODULE_CONTROLS, PEER_POLICIES
    from lookaheadkv_kernels.runtime import POLICIES

    assert ALL_POLICIES == (FULL, *POLICIES, *CONTROLS, *MODULE_CONTROLS, *PEER_POLICIES)
    assert harness._parser().get_default("policies") == ",".join(ALL_POLICIES)


def test_module_controls_are_the_rows_alone_the_paper_and_the_untrained_rows():
    from lookaheadkv_kernels.evaluation.policies import build_policy
    from lookaheadkv_kernels.runtime.lookahead import LookaheadModule

    model = tiny_llama()
    module = trained_looking(model)
    rows = build_policy("lookaheadkv-rows", module, model)
    assert rows.module is module and rows.window_votes == 0
    assert rows.options == LookaheadKV(module).options and rows.depth_ramp == LookaheadKV(module).depth_ramp
    paper = build_policy("lookaheadkv-paper", module, model)
    reference = LookaheadKV.paper(module)
    assert (paper.options, paper.depth_ramp, paper.window_votes) == (
        reference.options,
        reference.depth_ramp,
        reference.window_votes,
    )
    untrained = build_policy("lookaheadkv-untrained", module, model)
    fresh = LookaheadModule(model, n_lookahead=module.config.n_lookahead, rank=module.config.rank, seed=0)
    assert untrained.window_votes == 0 and untrained.module is not module
    assert all(torch.equal(a, b) for a, b in zip(untrained.module.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ValueError, match="lookaheadkv-rows"):
        build_policy("lookaheadkv-rows", None)


@pytest.mark.parametrize("name, same_budgets", [("snapkv-lkvpool", False), ("snapkv-lkvconfig", True)])
def test_snapkv_controls_pool_and_budget_like_lookaheadkv(name, same_budgets):
    from lookaheadkv_kernels.evaluation.policies import ALL_POLICIES, build_policy

    control, lookahead = build_policy(name, None), LookaheadKV(trained_looking(tiny_llama()))
    assert name in harness.parse_policies(f"snapkv,{name}") and name in ALL_POLICIES
    assert isinstance(control, SnapKV) and control.window == SnapKV().window
    assert (control.options.pool_kernel, control.options.pool_type) == (
        lookahead.options.pool_kernel,
        lookahead.options.pool_type,
    )
    budgets = control.layer_budgets(128, 4096, 30)
    assert (budgets == lookahead.layer_budgets(128, 4096, 30)) == same_budgets
    assert (budgets == [128] * 30) != same_budgets
    # Never below what SnapKV always keeps (4 sinks + its 32-token window) plus one scored key.
    assert min(control.layer_budgets(64, 4096, 30)) >= 37 and sum(control.layer_budgets(64, 4096, 30)) == 64 * 30


def test_bench_evict_measures_every_policy_against_the_plain_prefill(tokenizer):
    from lookaheadkv_kernels.evaluation import bench_evict

    model = tiny_llama()
    module = trained_looking(model)
    rows = bench_evict.bench_length(
        model, tokenizer, 300, ["lookaheadkv", "snapkv", "laq"], module, 64, 2, 8, lambda _: None
    )
    by = {r["policy"]: r for r in rows}
    assert set(by) == {bench_evict.PLAIN, "lookaheadkv", "snapkv", "laq"}
    assert by[bench_evict.PLAIN]["overhead_ms"] is None and len(by["laq"]["ttft_runs_ms"]) == 2
    assert by["lookaheadkv"]["eviction_work_ratio_to_lookaheadkv"] == pytest.approx(1.0)
    assert by["snapkv"]["kept_kv_bytes"] < by[bench_evict.PLAIN]["kept_kv_bytes"]
    assert (
        by["laq"]["peak_kv_bytes"] >= by["snapkv"]["peak_kv_bytes"]
    )  # LAQ holds the full cache until its draft is done
    meta = {"command": "x", "device": "cpu", "threads": 1, "budget": 64, "repeats": 2, "module": None}
    table = bench_evict.markdown(rows, meta)
    assert "| lookaheadkv |" in table and "laq/LookaheadKV" in table


def test_bench_evict_takes_no_ratio_of_an_overhead_within_the_prefill_noise():
    from lookaheadkv_kernels.evaluation import bench_evict

    def row(policy, ttft, runs, work):
        plain = policy == bench_evict.PLAIN
        return {
            "length": 1024,
            "prompt_tokens": 1000,
            "policy": policy,
            "ttft_ms": ttft,
            "ttft_runs_ms": runs,
            "overhead_ms": None if plain else ttft - 1000.0,
            "overhead_percent": None if plain else (ttft - 1000.0) / 10,
            "eviction_work_ms": None if plain else work,
            "eviction_work_percent": None if plain else work / 10,
            "overhead_ratio_to_lookaheadkv": None,
            "eviction_work_ratio_to_lookaheadkv": None,
            "peak_kv_bytes": 0,
            "kept_kv_bytes": 0,
        }

    meta = {"command": "x", "device": "cpu", "threads": 1, "budget": 64, "repeats": 2, "module": None}
    plain = row(bench_evict.PLAIN, 1000.0, [950.0, 1050.0], None)  # run-to-run spread: 100 ms
    noisy = bench_evict.markdown(
        [plain, row("lookaheadkv", 1060.0, [], 180.0), row("snapkv", 1001.0, [], 50.0), row("laq", 1600.0, [], 600.0)],
        meta,
    )
    assert (
        "TTFT overhead: LookaheadKV's +60 ms is within the plain prefill's run-to-run spread (100 ms): no ratio"
        in noisy
    )
    assert "work: LookaheadKV/SnapKV 3.60× (not met, ≤ 2×); laq/LookaheadKV 3.3×" in noisy
    clear = bench_evict.markdown(
        [plain, row("lookaheadkv", 1300.0, [], 180.0), row("snapkv", 1001.0, [], 50.0), row("laq", 6000.0, [], 600.0)],
        meta,
    )
    assert (
        "TTFT overhead: SnapKV's overhead is within the spread: no LookaheadKV/SnapKV ratio; laq/LookaheadKV 16.7× (met"
        in clear
    )


def test_a_record_cut_off_by_a_killed_run_is_dropped(tmp_path):
    path = tmp_path / "eval_k.jsonl"
    whole = {"uid": "a/300/0", "policy": "snapkv", "budget": 64, "score": 100.0}
    path.write_text(json.dumps(whole) + "\n" + '{"uid": "a/300/0", "policy": "la')
    store = harness.ResultStore(path)
    assert list(store.records.values()) == [whole] and path.read_text().endswith("\n")
    store.add({**whole, "policy": "streamingllm"})
    assert len(harness.ResultStore(path).records) == 2
