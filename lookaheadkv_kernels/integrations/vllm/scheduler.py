"""Engine core: which request evicts in which step, its block accounting, and the plan sent to the workers.

Every step, the scheduler's output carries a `StepPlan` (as the attribute `lookaheadkv`) that tells
the workers, per scheduled request that evicts:
- `windows`: the prompt rows whose queries score (SnapKV's observation window, LookaheadKV's window
  votes); the workers keep those queries as the prefill passes them, whichever chunk that is;
- `evictions`: the requests whose prompt is complete after this step; the workers score and
  compact every layer of it right after the step's forward;
- `offsets`: for requests already evicted, how many positions they dropped: a sequence that holds M
  entries of an N-token prompt decodes token i at position N + i (its RoPE) in slot M + i.

The kept count is known before the workers run (M = the budget, for every layer and KV head), so the
scheduler frees the blocks past it as soon as it plans the eviction: they can only be handed out in
a later step, which the workers run after this one's compaction. From then on, the request needs
slots for its true length minus the evicted positions (`allocate_slots`).

A request that evicts never reads or fills the prefix cache: compaction rewrites its blocks in
place, so they must be its own and must never serve another request as a cached prefix.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from .policies import POLICIES
from .settings import RequestEviction, engine_settings

logger = logging.getLogger("vllm.lookaheadkv")


@dataclass
class EvictionOrder:
    """Evict one request's `num_prompt`-token prompt after this step, to `eviction.budget` entries."""

    eviction: RequestEviction
    num_prompt: int


@dataclass
class StepPlan:
    offsets: dict[str, int] = field(default_factory=dict)
    windows: dict[str, tuple[int, int]] = field(default_factory=dict)
    evictions: dict[str, EvictionOrder] = field(default_factory=dict)


@dataclass
class RequestState:
    """A request that evicts: its eviction and the positions it has dropped so far (0: not yet)."""

    eviction: RequestEviction
    evicted: int = 0


def check_engine(vllm_config, kv_cache_config) -> None:
    """Refuse the engine configurations eviction does not support, before any request runs."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    problems = []
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        problems.append("a model whose layers all use full attention (one KV cache group)")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1 or parallel.decode_context_parallel_size > 1:
        problems.append("no pipeline or decode-context parallelism")
    hf_config = vllm_config.model_config.hf_config
    if hf_config.num_key_value_heads % parallel.tensor_parallel_size:
        problems.append("a tensor-parallel size that divides the number of KV heads (each rank evicts its own)")
    if vllm_config.num_speculative_tokens:
        problems.append("no speculative decoding")
    if vllm_config.kv_transfer_config is not None:
        problems.append("no KV connector")
    if problems:
        raise ValueError(f"LookaheadKV eviction in vLLM needs {'; '.join(problems)}")


def install() -> None:
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    init, add_request, schedule = Scheduler.__init__, Scheduler.add_request, Scheduler.schedule
    preempt, chunk_end = Scheduler._preempt_request, Scheduler._reserve_prefill_lookahead
    allocate_slots, cache_blocks = KVCacheManager.allocate_slots, KVCacheCoordinator.cache_blocks

    @functools.wraps(init)
    def scheduler_init(self, vllm_config, kv_cache_config, *args, **kwargs):
        init(self, vllm_config, kv_cache_config, *args, **kwargs)
        settings = engine_settings(vllm_config)
        self.lookaheadkv = settings is not None
        if self.lookaheadkv:
            check_engine(vllm_config, kv_cache_config)
            logger.info(
                "lookaheadkv: KV eviction on (defaults: policy %s, budget %s)", settings.policy, settings.budget
            )
            spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
            self.lookaheadkv_block_bytes = spec.page_size_bytes * len(kv_cache_config.kv_cache_groups[0].layer_names)

    @functools.wraps(add_request)
    def scheduler_add_request(self, request):
        if self.lookaheadkv:
            eviction = RequestEviction.from_extra_args(request.sampling_params and request.sampling_params.extra_args)
            request.lookaheadkv = None if eviction is None else RequestState(eviction)
            if eviction is not None:
                request.skip_reading_prefix_cache = True
        add_request(self, request)

    @functools.wraps(schedule)
    def scheduler_schedule(self, *args, **kwargs):
        output = schedule(self, *args, **kwargs)
        if self.lookaheadkv:
            output.lookaheadkv = plan_step(self, output)
        return output

    @functools.wraps(preempt)
    def scheduler_preempt(self, request, *args, **kwargs):
        preempt(self, request, *args, **kwargs)
        state = getattr(request, "lookaheadkv", None)
        if state is not None:
            state.evicted = 0  # its blocks are gone: it recomputes its prompt and is evicted again

    @functools.wraps(chunk_end)
    def scheduler_chunk_end(self, request, num_computed_tokens, num_new_tokens):
        num_new_tokens = chunk_end(self, request, num_computed_tokens, num_new_tokens)
        state = getattr(request, "lookaheadkv", None)
        if state is not None and not state.evicted and num_computed_tokens < request.num_prompt_tokens:
            # A request resumed after preemption recomputes its prompt and its answer so far: end a
            # chunk at the prompt's end, so it evicts there and recomputes its answer over the
            # evicted cache, as that answer was first computed.
            num_new_tokens = min(num_new_tokens, request.num_prompt_tokens - num_computed_tokens)
        return num_new_tokens

    @functools.wraps(allocate_slots)
    def manager_allocate_slots(self, request, *args, **kwargs):
        state = getattr(request, "lookaheadkv", None)
        if state is None or not state.evicted:
            return allocate_slots(self, request, *args, **kwargs)
        # The manager sizes a request by its computed tokens; an evicted one holds that many minus
        # the positions it dropped.
        request.num_computed_tokens -= state.evicted
        try:
            return allocate_slots(self, request, *args, **kwargs)
        finally:
            request.num_computed_tokens += state.evicted

    @functools.wraps(cache_blocks)
    def coordinator_cache_blocks(self, request, *args, **kwargs):
        if getattr(request, "lookaheadkv", None) is None:
            cache_blocks(self, request, *args, **kwargs)

    Scheduler.__init__ = scheduler_init
    Scheduler.add_request = scheduler_add_request
    Scheduler.schedule = scheduler_schedule
    Scheduler._preempt_request = scheduler_preempt
    Scheduler._reserve_prefill_lookahead = scheduler_chunk_end
    KVCacheManager.allocate_slots = manager_allocate_slots
    KVCacheCoordinator.cache_blocks = coordinator_cache_blocks


def plan_step(scheduler, output) -> StepPlan:
    """The plan of the step just scheduled (each request's computed tokens already include it);
    frees the blocks of the requests it evicts."""
    plan = StepPlan()
    for req_id, num_scheduled in output.num_scheduled_tokens.items():
        request = scheduler.requests[req_id]
        state = getattr(request, "lookaheadkv", None)
        if state is None:
            continue
        if state.evicted:
            plan.offsets[req_id] = state.evicted
            continue
        num_prompt, end = request.num_prompt_tokens, request.num_computed_tokens
        window = POLICIES[state.eviction.policy].query_window(num_prompt)
        if window and end - num_scheduled < num_prompt and end > num_prompt - window:
            plan.windows[req_id] = (num_prompt - window, num_prompt)
        if end == num_prompt:  # the prompt is complete (a chunk never ends past it before eviction)
            plan.evictions[req_id] = EvictionOrder(state.eviction, num_prompt)
            state.evicted = num_prompt - state.eviction.budget
            free_tail(scheduler, request, state.eviction.budget)
    return plan


def free_tail(scheduler, request, kept: int) -> None:
    """Return the request's blocks past its first `kept` slots to the pool, and log what that saved."""
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    blocks = manager.req_to_blocks[request.request_id]
    keep = -(-kept // manager.block_size)
    tail = blocks[keep:]
    del blocks[keep:]
    manager.block_pool.free_blocks(reversed(tail))
    logger.info(
        "lookaheadkv: request %s: %s keeps %d of %d prompt entries per layer and KV head; freed %d of %d KV "
        "blocks (%.1f MiB)",
        request.request_id,
        request.lookaheadkv.eviction.policy,
        request.lookaheadkv.eviction.budget,
        request.num_prompt_tokens,
        len(tail),
        len(tail) + keep,
        len(tail) * scheduler.lookaheadkv_block_bytes / 2**20,
    )
