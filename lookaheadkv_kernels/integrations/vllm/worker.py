"""Workers: true positions for evicted requests, and the eviction itself after a prefill's last step.

Each model runner follows the scheduler's `StepPlan` (scheduler.py):
- before the forward, every request that has evicted gets its slots and sequence length from its
  stored entries (position minus the positions it dropped) while its positions, hence RoPE, stay true;
- during the forward, each attention layer hands over the queries of the prompt rows a policy scores
  with (they are vLLM's own rotated queries, so they match the model exactly);
- after the forward, the requests whose prefill ended are evicted layer by layer: the layer's scores
  (`paged_attention_scores` over vLLM's cache for the window queries; for LookaheadKV the lookahead
  rows run through the layer with their LoRA, their keys and values joined to the prompt's in a local
  tensor, never the cache, through `lookahead_attention`), then `paged_select_compact` compacts the
  layer in place in the request's own blocks. The request's block table is cut to its kept blocks;
  the scheduler has already returned the rest to the pool.

With tensor parallelism each rank holds its own KV heads: it scores and compacts those, and the
lookahead rows follow vLLM's sharding (LoRA of column-parallel layers cut by output rows, of
row-parallel ones by input columns, added before the all-reduce).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ... import lookahead_attention, paged_attention_scores, paged_select_compact
from .module import ATTENTION_TARGETS, LookaheadWeights, load_weights
from .policies import NUM_SINK, POLICIES, add_votes, shift_scores
from .settings import engine_settings


class BlockLayout:
    """Where vLLM's CPU attention backend keeps each key and value element inside a cache block.

    The backend packs blocks for its kernels (keys transposed to [D, block_size] per head for its
    vector kernels, token pairs interleaved for AMX), which is neither of the paged ops' layouts,
    and their in-place compaction needs each entry's D values contiguous. So a layer's blocks of the
    requests being evicted are read into an HND scratch cache, scored and compacted there with the
    paged ops, and their kept blocks written back. The map is learned, not assumed: a block of known
    values is written with the backend's own cache-write op and each value is found where it landed.
    """

    def __init__(self, attention, cache: torch.Tensor):
        from vllm import _custom_ops as ops

        _, heads, block_size, width = cache.shape
        self.shape = (heads, block_size, width // 2)
        count = heads * block_size * (width // 2)  # keys (then as many values) of one block, in HND order
        # Element e is written as its base-256 digits, one pass each: integers below 256 are exact in every dtype.
        landed = torch.zeros(2 * count, dtype=torch.long)
        for digit in range(math.ceil(math.log(2 * count, 256))):
            code = torch.div(torch.arange(2 * count), 256**digit, rounding_mode="floor") % 256
            key, value = (
                part.view(self.shape).transpose(0, 1).to(cache.dtype).contiguous() for part in code.split(count)
            )
            block = torch.zeros((1, *cache.shape[1:]), dtype=cache.dtype)
            k_view, v_view = block.view(1, heads, 2 * block_size, -1).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                key,
                value,
                k_view,
                v_view,
                torch.arange(block_size),
                attention.isa,
                k_scale=attention._k_scale_float,
                v_scale=attention._v_scale_float,
            )
            landed += block.flatten().round().long() * 256**digit
        if not torch.equal(landed.sort().values, torch.arange(2 * count)):
            raise ValueError(f"cannot map vLLM's KV cache block layout (ISA {attention.isa!r}, {cache.dtype})")
        offset = torch.empty_like(landed)
        offset[landed] = torch.arange(2 * count)
        self.key_at, self.value_at = offset.split(count)

    def read(self, cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `blocks`, each [len(blocks), Hkv, block_size, D] contiguous."""
        flat = cache[blocks].view(len(blocks), -1)
        return flat[:, self.key_at].view(-1, *self.shape), flat[:, self.value_at].view(-1, *self.shape)

    def write(self, cache: torch.Tensor, blocks: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        flat = torch.empty(len(blocks), 2 * self.key_at.numel(), dtype=cache.dtype)
        flat[:, self.key_at] = keys.reshape(len(blocks), -1)
        flat[:, self.value_at] = values.reshape(len(blocks), -1)
        cache[blocks] = flat.view(len(blocks), *cache.shape[1:])


class Evictor:
    """Eviction state of one model runner."""

    def __init__(self, runner, record_kept: bool):
        self.runner = runner
        self.layers = list(runner.model.model.layers)
        for index, layer in enumerate(self.layers):
            missing = [
                name
                for name in ("self_attn.qkv_proj", "self_attn.o_proj", "self_attn.rotary_emb", "self_attn.attn")
                + ("mlp.gate_up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
                if not _has(layer, name)
            ]
            if missing:
                raise ValueError(f"LookaheadKV eviction does not know this model's layer {index}: no {missing}")
        first = self.layers[0].self_attn
        self.num_heads, self.num_kv_heads = first.attn.num_heads, first.attn.num_kv_heads
        self.head_dim, self.scale = first.attn.head_size, float(first.attn.impl.scale)
        self.dtype = runner.model_config.dtype
        self.captures: dict[str, list[torch.Tensor]] = {}  # request -> per layer [window, Hq, D] queries
        self.step_rows: list[tuple[int, int, str, int]] = []  # (batch row, count, request, window row)
        self.weights: dict[str, LookaheadWeights] = {}
        self.record_kept = record_kept
        self.kept: list[tuple[str, list[torch.Tensor]]] = []  # (request, per layer kept positions) per eviction
        self.layout: BlockLayout | None = None  # learned at the first eviction (the cache exists by then)
        for index, layer in enumerate(self.layers):
            impl = layer.self_attn.attn.impl
            impl.forward = self._capturing(index, impl.forward)

    def _capturing(self, index: int, forward):
        @functools.wraps(forward)
        def capture_then_attend(layer, query, *args, **kwargs):
            for start, count, req_id, row in self.step_rows:
                self.captures[req_id][index][row : row + count] = query[start : start + count]
            return forward(layer, query, *args, **kwargs)

        return capture_then_attend

    # ---- before the forward ----------------------------------------------------------------------

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self.captures.pop(req_id, None)

    def prepare(self, plan, num_scheduled_tokens: np.ndarray) -> None:
        """Point this step's capture rows at the window queries it computes, and move the evicted
        requests' slots and lengths to their stored entries."""
        runner, batch = self.runner, self.runner.input_batch
        self.step_rows = []
        starts = runner.query_start_loc.np
        for req_id, (low, high) in plan.windows.items():
            index = batch.req_id_to_index[req_id]
            first = int(batch.num_computed_tokens_cpu[index])
            a, b = max(low, first), min(high, first + int(num_scheduled_tokens[index]))
            if a < b:
                if req_id not in self.captures:
                    shape = (high - low, self.num_heads, self.head_dim)
                    self.captures[req_id] = [torch.empty(shape, dtype=self.dtype) for _ in self.layers]
                self.step_rows.append((int(starts[index]) + a - first, b - a, req_id, a - low))
        if not plan.offsets:
            return
        num_reqs = batch.num_reqs
        offsets = np.zeros(num_reqs, dtype=np.int64)
        for req_id, evicted in plan.offsets.items():
            offsets[batch.req_id_to_index[req_id]] = evicted
        per_request = torch.from_numpy(offsets)
        runner.seq_lens[:num_reqs] -= per_request.to(runner.seq_lens.dtype)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= per_request.to(runner.optimistic_seq_lens_cpu.dtype)
        total = int(num_scheduled_tokens.sum())
        per_token = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens))
        slots = runner.positions[:total] - per_token.to(runner.positions.device)
        batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], slots)

    # ---- after the forward -----------------------------------------------------------------------

    def evict(self, plan) -> None:
        runner = self.runner
        req_ids = list(plan.evictions)
        orders = [plan.evictions[r] for r in req_ids]
        policies = [POLICIES[o.eviction.policy] for o in orders]
        first_cache = self.layers[0].self_attn.attn.kv_cache
        if self.layout is None:
            self.layout = BlockLayout(self.layers[0].self_attn.attn, first_cache)
        block_size = first_cache.shape[2]
        # The requests' blocks, read into one HND scratch cache per layer: row b of `table` holds
        # request b's scratch blocks, in its block-table order.
        blocks = [runner.requests[r].block_ids[0][: -(-o.num_prompt // block_size)] for r, o in zip(req_ids, orders)]
        starts = np.cumsum([0, *map(len, blocks)])
        table = torch.zeros(len(blocks), max(map(len, blocks)), dtype=torch.int32)
        for b, ids in enumerate(blocks):
            table[b, : len(ids)] = torch.arange(starts[b], starts[b + 1], dtype=torch.int32)
        block_ids = torch.tensor([i for ids in blocks for i in ids])
        kept_blocks = [-(-o.eviction.budget // block_size) for o in orders]
        write_rows = torch.cat([torch.arange(starts[b], starts[b] + kept_blocks[b]) for b in range(len(blocks))])
        seq_lens = torch.tensor([o.num_prompt for o in orders], dtype=torch.int32)
        num_scored = [p.num_scored(o.num_prompt) for p, o in zip(policies, orders)]
        budgets = torch.tensor([o.eviction.budget for o in orders], dtype=torch.int32)
        rows = LookaheadRows(self, req_ids, orders, table)
        recorded = [[] for _ in req_ids] if self.record_kept else []
        self.kept += zip(req_ids, recorded)
        for index, layer in enumerate(self.layers):
            cache = layer.self_attn.attn.kv_cache
            k_cache, v_cache = self.layout.read(cache, block_ids)
            scores = torch.full((len(orders), self.num_kv_heads, max(num_scored)), -torch.inf)
            votes = self._window_scores(index, req_ids, orders, policies, k_cache, table)
            row_scores = rows.layer(index, k_cache, v_cache)
            for b, (policy, order) in enumerate(zip(policies, orders)):
                if policy.lookahead:
                    layer_scores = row_scores[req_ids[b]]
                    if b in votes:
                        layer_scores = add_votes(layer_scores, votes[b], policy.window_votes, policy.num_sink)
                elif b in votes:
                    layer_scores = votes[b]
                else:  # recency: the newest keys score highest
                    layer_scores = torch.arange(order.num_prompt, dtype=torch.float32).expand(self.num_kv_heads, -1)
                scores[b, :, : num_scored[b]] = layer_scores
            _, kept = paged_select_compact(
                scores,
                k_cache,
                v_cache,
                table,
                seq_lens,
                budgets,
                num_scored=torch.tensor(num_scored, dtype=torch.int32),
                num_sink=NUM_SINK,
                layout="HND",
            )
            self.layout.write(cache, block_ids[write_rows], k_cache[write_rows], v_cache[write_rows])
            for b, layers in enumerate(recorded):
                layers.append(kept[b, :, : orders[b].eviction.budget].clone())
        for req_id, keep in zip(req_ids, kept_blocks):
            self._cut_block_table(req_id, keep)
        self.forget(req_ids)

    def _window_scores(self, index, req_ids, orders, policies, k_cache, block_table) -> dict[int, torch.Tensor]:
        """Per request that scores with window queries (by batch row): the window's scores of the keys
        before it, [Hkv, num_prompt - window], shifted; one `paged_attention_scores` call per option set."""
        groups: dict[object, list[int]] = {}
        for b, policy in enumerate(policies):
            if policy.query_window(orders[b].num_prompt):
                groups.setdefault(policy.options, []).append(b)
        votes = {}
        for options, members in groups.items():
            queries = [self.captures[req_ids[b]][index] for b in members]
            offsets = torch.tensor([0, *np.cumsum([q.shape[0] for q in queries])], dtype=torch.int32)
            prompt_lens = torch.tensor([orders[b].num_prompt for b in members], dtype=torch.int32)
            windows = torch.tensor([q.shape[0] for q in queries], dtype=torch.int32)
            window_scores = paged_attention_scores(
                torch.cat(queries),
                offsets,
                k_cache,
                block_table[members],
                prompt_lens,
                num_scored=prompt_lens - windows,
                scale=self.scale,
                gqa_reduce=options.gqa_reduce,
                pool_kernel=options.pool_kernel,
                pool_type=options.pool_type,
                query_reduce=options.query_reduce,
                layout="HND",
            )
            for row, b in enumerate(members):
                scored = orders[b].num_prompt - queries[row].shape[0]
                votes[b] = shift_scores(window_scores[row, :, :scored], options.pool_shift)
        return votes

    def _cut_block_table(self, req_id: str, keep: int) -> None:
        """Drop the request's blocks past `keep` on this worker (the scheduler has freed them)."""
        del self.runner.requests[req_id].block_ids[0][keep:]
        batch = self.runner.input_batch
        row = batch.req_id_to_index.get(req_id)
        if row is not None:
            table = batch.block_table[0]
            table.block_table.np[row, keep : table.num_blocks_per_row[row]] = 0
            table.num_blocks_per_row[row] = keep

    def module(self, path: str) -> LookaheadWeights:
        if path not in self.weights:
            self.weights[path] = load_weights(path, self.runner.model_config.hf_config, self._shards())
        return self.weights[path]

    def _shards(self) -> dict[str, tuple[str, slice]]:
        attn, mlp = self.layers[0].self_attn, self.layers[0].mlp
        rank, q_width, kv_width = attn.o_proj.tp_rank, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inter = mlp.down_proj.input_size_per_partition
        q, kv, mlp_part = (slice(rank * w, (rank + 1) * w) for w in (q_width, kv_width, inter))
        return {
            "q": ("out", q),
            "k": ("out", kv),
            "v": ("out", kv),
            "o": ("in", q),
            "gate": ("out", mlp_part),
            "up": ("out", mlp_part),
            "down": ("in", mlp_part),
        }


class LookaheadRows:
    """The lookahead rows of the LookaheadKV requests of one eviction, advanced one layer at a time.

    Rows of requests that share a module run batched through the linear layers; attention runs per
    request over its own prompt keys (gathered from its blocks, before the layer is compacted)."""

    def __init__(self, evictor: Evictor, req_ids, orders, block_table):
        self.evictor = evictor
        self.groups = {}
        for b, (req_id, order) in enumerate(zip(req_ids, orders)):
            if POLICIES[order.eviction.policy].lookahead:
                self.groups.setdefault(order.eviction.module, []).append((b, req_id, order))
        self.block_table = block_table
        self.hidden, self.positions = {}, {}
        for path, members in self.groups.items():
            weights = evictor.module(path)
            n = weights.n_lookahead
            self.hidden[path] = weights.embeddings.to(evictor.dtype).repeat(len(members), 1)
            self.positions[path] = torch.cat([torch.arange(o.num_prompt, o.num_prompt + n) for _, _, o in members])

    def layer(self, index: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run every group's rows through layer `index`; each request's scores [Hkv, num_prompt] of its prompt keys."""
        scores = {}
        for path, members in self.groups.items():
            weights = self.evictor.module(path)
            self.hidden[path], group_scores = self._layer(index, path, weights, members, k_cache, v_cache)
            scores.update(group_scores)
        return scores

    def _layer(self, index, path, weights, members, k_cache, v_cache):
        ev, hidden = self.evictor, self.hidden[path]
        layer = ev.layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        lora, scale, n = weights.lora[index], weights.scale, weights.n_lookahead
        options = POLICIES["lookaheadkv"].options

        x = layer.input_layernorm(hidden)
        qkv = attn.qkv_proj(x)[0]
        q_width, kv_width = ev.num_heads * ev.head_dim, ev.num_kv_heads * ev.head_dim
        q, k, v = (
            _plus_lora(part, x, lora.get(target), scale)
            for part, target in zip(qkv.split([q_width, kv_width, kv_width], dim=-1), ATTENTION_TARGETS)
        )
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of q and k before RoPE
            q = attn.q_norm(q.reshape(-1, ev.head_dim)).view(q.shape)
            k = attn.k_norm(k.reshape(-1, ev.head_dim)).view(k.shape)
        q, k = attn.rotary_emb(self.positions[path], q.contiguous(), k.contiguous())

        out, scores = torch.empty_like(q), {}
        for g, (b, req_id, order) in enumerate(members):
            rows = slice(g * n, (g + 1) * n)
            blocks = self.block_table[b, : -(-order.num_prompt // k_cache.shape[2])].long()
            keys = torch.cat([_gather(k_cache, blocks, order.num_prompt), _heads(k[rows], ev.head_dim)], dim=1)
            values = torch.cat([_gather(v_cache, blocks, order.num_prompt), _heads(v[rows], ev.head_dim)], dim=1)
            attended, row_scores = lookahead_attention(
                _heads(q[rows], ev.head_dim)[None],
                keys[None],
                values[None],
                num_scored=order.num_prompt,
                scale=ev.scale,
                gqa_reduce=options.gqa_reduce,
                pool_kernel=options.pool_kernel,
                pool_type=options.pool_type,
                query_reduce=options.query_reduce,
            )
            out[rows] = attended[0].transpose(0, 1).reshape(n, -1)
            scores[req_id] = shift_scores(row_scores[0], options.pool_shift)
        hidden = hidden + _row_parallel(attn.o_proj, out, lora.get("o"), scale)

        x = layer.post_attention_layernorm(hidden)
        gate, up = mlp.gate_up_proj(x)[0].chunk(2, dim=-1)
        gate, up = _plus_lora(gate, x, lora.get("gate"), scale), _plus_lora(up, x, lora.get("up"), scale)
        hidden = hidden + _row_parallel(mlp.down_proj, F.silu(gate) * up, lora.get("down"), scale)
        return hidden, scores


def _has(module, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return False
    return True


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[T, H·D] -> [H, T, D]."""
    return x.reshape(x.shape[0], -1, head_dim).transpose(0, 1)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` entries of a sequence as [Hkv, length, D] from a [num_blocks, Hkv, block_size, D] cache."""
    picked = cache[blocks]
    return picked.transpose(0, 1).reshape(picked.shape[1], -1, picked.shape[3])[:, :length]


def _lora(x: torch.Tensor, pair, scale: float) -> torch.Tensor:
    a, b = pair
    return scale * F.linear(F.linear(x.float(), a), b)


def _plus_lora(out: torch.Tensor, x: torch.Tensor, pair, scale: float) -> torch.Tensor:
    """out + the LoRA term of x, accumulated in float32 (as the runtime's `lora_linear`)."""
    return out if pair is None else out + _lora(x, pair, scale).to(out.dtype)


def _row_parallel(linear, x: torch.Tensor, pair, scale: float) -> torch.Tensor:
    """A row-parallel layer of this rank's input shard plus its share of the LoRA term, then the all-reduce."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    bias = linear.bias if linear.tp_rank == 0 and not linear.skip_bias_add else None
    out = _plus_lora(linear.quant_method.apply(linear, x, bias), x, pair, scale)
    return tensor_model_parallel_all_reduce(out) if linear.tp_size > 1 else out


def evictor(runner) -> Evictor:
    found = getattr(runner, "lookaheadkv_evictor", None)
    if found is None:
        found = runner.lookaheadkv_evictor = Evictor(runner, engine_settings(runner.vllm_config).record_kept)
    return found


def take_kept_positions(worker) -> list[tuple[str, list[torch.Tensor]]]:
    """The kept positions of every eviction since the last call, in order: (request id, per layer
    [Hkv, M] positions of this rank's KV heads); needs `record_kept` in the engine's settings. For
    `LLM.collective_rpc`."""
    found = evictor(worker.model_runner)
    kept, found.kept = found.kept, []
    return kept


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    prepare_inputs, execute_model = GPUModelRunner._prepare_inputs, GPUModelRunner.execute_model

    @functools.wraps(prepare_inputs)
    def runner_prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        plan = getattr(scheduler_output, "lookaheadkv", None)
        if plan is not None:
            evictor(self).prepare(plan, num_scheduled_tokens)
        return result

    @functools.wraps(execute_model)
    def runner_execute_model(self, scheduler_output, *args, **kwargs):
        plan = getattr(scheduler_output, "lookaheadkv", None)
        if plan is None:
            return execute_model(self, scheduler_output, *args, **kwargs)
        state = evictor(self)
        state.forget(scheduler_output.finished_req_ids | (scheduler_output.preempted_req_ids or set()))
        output = execute_model(self, scheduler_output, *args, **kwargs)
        state.step_rows = []
        if plan.evictions:
            with torch.inference_mode():
                state.evict(plan)
        return output

    GPUModelRunner._prepare_inputs = runner_prepare_inputs
    GPUModelRunner.execute_model = runner_execute_model
