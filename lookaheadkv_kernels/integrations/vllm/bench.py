"""`lookaheadkv bench-vllm`: what eviction buys a vLLM engine at a fixed KV cache size.

Three runs, each in a fresh engine (vLLM's engine core in its own child process of this command):
- throughput without eviction, then with it: `--requests` suite prompts of `--prompt-tokens`
  tokens, all submitted at once, each answered with exactly `--max-tokens` greedy tokens, in a KV
  cache of `--kv-cache-gib`. Reported: the most requests running at once, output tokens per second
  over the whole run and over its decode-only steps, requests preempted, and the answers' score;
- time to first token of one prompt alone, plain prefill against prefill + eviction (prefix
  caching off, so every run prefills), alternated `--ttft-repeats` times; with the eviction work
  itself timed inside the engine.

Results: <out>/vllm_<name>.md and .json, headed by the command, commit, date and machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...argtypes import CommandParser, positive_int
from ...provenance import provenance
from .policies import POLICIES

SUITE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "fact_qa", "variable_tracking")


def _parser() -> CommandParser:
    parser = CommandParser(prog="lookaheadkv bench-vllm", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="HF checkpoint directory (default: the converted embedded SmolLM2)"
    )
    parser.add_argument("--requests", type=positive_int, default=64, help="requests of the throughput runs")
    parser.add_argument("--prompt-tokens", type=positive_int, default=4096, help="prompt length (at most)")
    parser.add_argument("--max-tokens", type=positive_int, default=128, help="tokens generated per request")
    parser.add_argument("--budget", type=positive_int, default=128, help="KV entries kept per layer and KV head")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="lookaheadkv", help="eviction policy")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size in GiB (default 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="model dtype")
    parser.add_argument("--block-size", type=positive_int, default=128, help="KV cache block size (vLLM's CPU default)")
    parser.add_argument("--ttft-repeats", type=positive_int, default=3, help="timed runs per side of the TTFT run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory")
    parser.add_argument("--name", default="cpu", help="results: <out>/vllm_<name>.{md,json}")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        parser.error('needs vLLM: pip install -e ".[vllm]" (docs/vllm.md)')
    model = args.model or _converted_smollm2()
    if model is None or not (model / "config.json").is_file():
        parser.error(
            "argument --model: no HF checkpoint directory; the embedded SmolLM2 is converted by "
            "`load_model('smollm2')` of the runtime (its own environment, docs/vllm.md)"
        )
    if args.kv_cache_gib <= 0:
        parser.error("argument --kv-cache-gib: must be > 0")
    run = {
        "model": str(model),
        "dtype": args.dtype,
        "block_size": args.block_size,
        "kv_cache_bytes": int(args.kv_cache_gib * 2**30),
        "max_model_len": args.prompt_tokens + args.max_tokens,
        "eviction": {"policy": args.policy, "budget": args.budget},
    }
    prompts, answers = _prompts(model, args.requests, args.prompt_tokens)
    results = {}
    for label, eviction in (("without eviction", None), ("with eviction", run["eviction"])):
        print(f"bench-vllm: throughput {label} ...", file=sys.stderr, flush=True)
        spec = {**run, "mode": "throughput", "eviction": eviction, "prompts": prompts, "max_tokens": args.max_tokens}
        results[label] = _child(spec)
        results[label]["score"] = _score(results[label].pop("texts"), answers)
    print("bench-vllm: time to first token ...", file=sys.stderr, flush=True)
    ttft = _child({**run, "mode": "ttft", "prompts": prompts[:1], "repeats": args.ttft_repeats})
    command = " ".join(["lookaheadkv bench-vllm", *(argv if argv is not None else sys.argv[1:])])
    import vllm

    results_file = args.out / f"vllm_{args.name}.md"
    meta = {"command": command, "header": provenance(str(results_file), command), **vars(args), "model": str(model)}
    meta["vllm"] = vllm.__version__
    meta["out"], meta["prompt_lengths"] = str(args.out), [len(p) for p in prompts]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"vllm_{args.name}.json").write_text(
        json.dumps({"meta": meta, "throughput": results, "ttft": ttft}, indent=2) + "\n"
    )
    table = markdown(meta, results, ttft)
    results_file.write_text(table)
    print(table)
    return 0


def _converted_smollm2() -> Path | None:
    root = Path(os.environ.get("LOOKAHEADKV_CACHE") or Path.home() / ".cache" / "lookaheadkv")
    found = sorted(root.glob("SmolLM2-135M-Instruct-*/config.json"))
    return found[-1].parent if found else None


def _prompts(model: Path, count: int, length: int) -> tuple[list[list[int]], list[tuple[str, ...]]]:
    """`count` suite samples fitted to `length` tokens (prompt + the task's answer allowance), tasks in turn."""
    from transformers import AutoTokenizer

    from ...evaluation.tasks import make_sample, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = [make_sample(SUITE_TASKS[i % len(SUITE_TASKS)], length, i, tokenizer) for i in range(count)]
    return [prompt_ids(s, tokenizer) for s in samples], [s.answers for s in samples]


def _score(texts: list[str], answers) -> float:
    from ...evaluation.tasks import score

    return sum(score(text, expected) for text, expected in zip(texts, answers)) / len(texts)


def _child(spec: dict) -> dict:
    """Run one engine in a fresh process (this module's `__main__`) and return what it measured."""
    with tempfile.TemporaryDirectory() as scratch:
        spec_file, result_file = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec_file.write_text(json.dumps(spec))
        log = Path(scratch) / "engine.log"
        with log.open("w") as stream:
            done = subprocess.run(
                [sys.executable, "-m", __name__, str(spec_file), str(result_file)], stdout=stream, stderr=stream
            )
        if done.returncode != 0:
            raise RuntimeError(f"the benchmark engine failed:\n{log.read_text()[-4000:]}")
        return json.loads(result_file.read_text())


# ---- in the child process -----------------------------------------------------------------------


def _engine(spec: dict, eviction: dict | None, prefix_caching: bool):
    from vllm import LLM

    additional = {"lookaheadkv": eviction} if eviction else {}
    return LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        block_size=spec["block_size"],
        kv_cache_memory_bytes=spec["kv_cache_bytes"],
        max_model_len=spec["max_model_len"],
        enforce_eager=True,
        enable_prefix_caching=prefix_caching,
        additional_config=additional,
    )


def _throughput(spec: dict) -> dict:
    from vllm import SamplingParams

    llm = _engine(spec, spec["eviction"], prefix_caching=True)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    schedule, scheduled = scheduler.schedule, []

    def recorded_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        scheduled.append(output)
        return output

    scheduler.schedule = recorded_schedule  # observes each step: prefill tokens in it, preemptions
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, prompt in enumerate(spec["prompts"]):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    texts, first_token, seen, running = {}, {}, {}, []
    preempted = decode_seconds = decode_tokens = 0
    while engine.has_unfinished_requests():
        scheduled.clear()
        step_start = time.perf_counter()
        outputs = engine.step()
        seconds, now = time.perf_counter() - step_start, time.perf_counter() - start
        running.append(len(scheduler.running))
        generated = 0
        for output in outputs:
            count = len(output.outputs[0].token_ids)
            generated += count - seen.get(output.request_id, 0)
            seen[output.request_id] = count
            if count:
                first_token.setdefault(output.request_id, now)
            if output.finished:
                texts[output.request_id] = output.outputs[0].text
        preempted += sum(len(o.preempted_req_ids or ()) for o in scheduled)
        if all(o.total_num_scheduled_tokens == len(o.num_scheduled_tokens) for o in scheduled):  # one token each
            decode_seconds, decode_tokens = decode_seconds + seconds, decode_tokens + generated
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "peak_running": max(running),
        "mean_running": statistics.mean(running),
        "seconds": wall,
        "output_tokens_per_s": sum(seen.values()) / wall,
        "cpu_seconds": cpu,
        "output_tokens_per_cpu_s": sum(seen.values()) / cpu,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else None,
        "median_ttft_s": statistics.median(first_token.values()),
        "preemptions": preempted,
        "kv_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1,
        "omp_threads": os.environ["OMP_NUM_THREADS"],
        "texts": [texts[str(i)] for i in range(len(spec["prompts"]))],
    }


def _ttft(spec: dict) -> dict:
    from vllm import SamplingParams

    from . import worker

    work = []
    evict = worker.Evictor.evict

    def timed_evict(self, plan):
        begin = time.perf_counter()
        evict(self, plan)
        work.append(time.perf_counter() - begin)

    worker.Evictor.evict = timed_evict
    llm = _engine(spec, spec["eviction"], prefix_caching=False)
    engine, prompt = llm.llm_engine, spec["prompts"][0]

    def first_token_seconds(policy: str) -> float:
        params = SamplingParams(max_tokens=1, temperature=0, extra_args={"lookaheadkv_policy": policy})
        begin = time.perf_counter()
        engine.add_request(f"{policy}-{time.perf_counter()}", {"prompt_token_ids": prompt}, params)
        while not any(o.outputs[0].token_ids for o in engine.step()):
            pass
        return time.perf_counter() - begin

    first_token_seconds("full")  # warm-up
    times = {"full": [], spec["eviction"]["policy"]: []}
    for _ in range(spec["repeats"]):
        for policy in times:
            times[policy].append(first_token_seconds(policy))
    return {"prompt_tokens": len(prompt), "seconds": times, "eviction_work_s": work}


def markdown(meta: dict, results: dict, ttft: dict) -> str:
    off, on = results["without eviction"], results["with eviction"]
    lengths = meta["prompt_lengths"]
    lines = [
        "# LookaheadKV eviction inside vLLM (CPU)",
        "",
        meta["header"],
        f"vLLM {meta['vllm']} (CPU). SmolLM2-135M-Instruct, {meta['dtype']}, KV cache {meta['kv_cache_gib']} GiB ({off['kv_blocks']} blocks of "
        f"{meta['block_size']} tokens); {meta['requests']} requests of {min(lengths)}–{max(lengths)} prompt tokens "
        f"(suite samples), {meta['max_tokens']} output tokens each (greedy, EOS ignored), all submitted at once; "
        f"eviction: {meta['policy']} at budget {meta['budget']}. Engine core in the benchmark's process, "
        f"OpenMP threads {off['omp_threads']}.",
        "",
        "| run | peak running | mean running | wall s | output tok/s | CPU s | output tok/CPU s | "
        "decode-only tok/s | median TTFT s | preemptions | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        decode = "—" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.1f}"
        lines.append(
            f"| {label} | {r['peak_running']} | {r['mean_running']:.1f} | {r['seconds']:.1f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['cpu_seconds']:.1f} | {r['output_tokens_per_cpu_s']:.1f} | "
            f"{decode} | {r['median_ttft_s']:.1f} | {r['preemptions']} | "
            f"{r['score']:.2f} |"
        )
    ratio = on["output_tokens_per_s"] / off["output_tokens_per_s"]
    cpu_ratio = on["output_tokens_per_cpu_s"] / off["output_tokens_per_cpu_s"]
    decode_ratio = (
        on["decode_tokens_per_s"] / off["decode_tokens_per_s"]
        if on["decode_tokens_per_s"] and off["decode_tokens_per_s"]
        else None
    )
    full, evicting = ttft["seconds"]["full"], ttft["seconds"][meta["policy"]]
    plain, evicted = statistics.median(full), statistics.median(evicting)
    work = statistics.median(ttft["eviction_work_s"])
    lines += [
        "",
        f"- Concurrency: {on['peak_running'] / off['peak_running']:.1f}× the peak running requests "
        f"(target ≥ 4×: {'met' if on['peak_running'] >= 4 * off['peak_running'] else 'not met'}).",
        f"- Output throughput: {ratio:.2f}× over the whole run (target ≥ 2×: {'met' if ratio >= 2 else 'not met'}), "
        f"{cpu_ratio:.2f}× per CPU second (the machine is shared: CPU time is what the load leaves comparable)"
        + ("" if decode_ratio is None else f"; {decode_ratio:.2f}× over the decode-only steps")
        + ".",
        f"- Time to first token, one {ttft['prompt_tokens']}-token prompt alone, median of {len(full)}: plain "
        f"prefill {plain:.2f} s (runs {', '.join(f'{t:.2f}' for t in full)}), with {meta['policy']} eviction "
        f"{evicted:.2f} s (runs {', '.join(f'{t:.2f}' for t in evicting)}): {100 * (evicted - plain) / plain:+.1f} %; "
        f"the eviction work itself {work:.2f} s = {100 * work / plain:.1f} % of the prefill "
        f"(target ≤ 10 %: {'met' if work <= 0.1 * plain else 'not met'}).",
    ]
    return "\n".join(lines) + "\n"


def _child_main(spec_file: str, result_file: str) -> None:
    # vLLM binds its worker to the cores it does not reserve (one here); in this process that worker
    # would otherwise run as many OpenMP threads as the machine has cores, on fewer cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler is read in this process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = json.loads(Path(spec_file).read_text())
    result = _throughput(spec) if spec["mode"] == "throughput" else _ttft(spec)
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
