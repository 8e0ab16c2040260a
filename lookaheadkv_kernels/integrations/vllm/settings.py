"""What a vLLM engine and each of its requests ask of eviction.

Per engine: `additional_config={"lookaheadkv": {"policy": ..., "budget": ..., "module": ...}}`
(`--additional-config` on `vllm serve`); without the "lookaheadkv" key the plugin does nothing.
Per request: `SamplingParams(extra_args={"lookaheadkv_policy": ..., "lookaheadkv_budget": ...,
"lookaheadkv_module": ...})` (`vllm_xargs` in an OpenAI request body) override the engine's.

The API process resolves each request once (`resolve_request`) and writes the result back into its
extra_args (`RequestEviction.to_extra_args`): the engine core and the workers read that, so a
request they see is already valid.
"""

from __future__ import annotations

from dataclasses import dataclass

from .module import check_module, shipped_module
from .policies import FULL, POLICIES, policy_names, resolve_budget

CONFIG_KEY = "lookaheadkv"
ENGINE_KEYS = ("policy", "budget", "module", "record_kept")
REQUEST_PREFIX = "lookaheadkv_"
REQUEST_KEYS = tuple(REQUEST_PREFIX + key for key in ("policy", "budget", "module"))
RESOLVED_KEY = "lookaheadkv_resolved"  # written by the API process, read by the engine core and workers


class SettingsError(ValueError):
    """A bad eviction setting, with the name of the parameter it came from."""

    def __init__(self, message: str, parameter: str):
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class EngineSettings:
    """The engine's defaults. `record_kept` keeps each eviction's kept positions on the workers
    (`worker.take_kept_positions`), for tests and inspection."""

    policy: str = "lookaheadkv"
    budget: int | float | None = None
    module: str | None = None
    record_kept: bool = False


def engine_settings(vllm_config) -> EngineSettings | None:
    """The engine's settings, or None when the engine was not started with eviction."""
    additional = getattr(vllm_config, "additional_config", None)
    if not isinstance(additional, dict) or CONFIG_KEY not in additional:
        return None
    raw = additional[CONFIG_KEY]
    if not isinstance(raw, dict):
        raise SettingsError(f'additional_config["{CONFIG_KEY}"] must be an object, got {raw!r}', CONFIG_KEY)
    unknown = sorted(set(raw) - set(ENGINE_KEYS))
    if unknown:
        raise SettingsError(
            f'unknown keys {unknown} in additional_config["{CONFIG_KEY}"]; known: {list(ENGINE_KEYS)}', CONFIG_KEY
        )
    settings = EngineSettings(**raw)
    _check_policy(settings.policy, f"{CONFIG_KEY}.policy")
    if settings.policy != FULL and settings.budget is None:
        raise SettingsError(
            f'additional_config["{CONFIG_KEY}"] needs a "budget" for policy {settings.policy!r}', "budget"
        )
    if settings.budget is not None:
        resolve_budget(settings.budget, 1 << 30)  # the type and range; ratios resolve per prompt
    return settings


@dataclass(frozen=True)
class RequestEviction:
    """One request's eviction: its policy, the entries it keeps per layer and KV head of its
    prompt (`budget`, < the prompt), and the lookahead module's directory (LookaheadKV only)."""

    policy: str
    budget: int
    module: str | None = None

    def to_extra_args(self) -> dict:
        return {RESOLVED_KEY: [self.policy, self.budget, self.module or ""]}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> RequestEviction | None:
        resolved = (extra_args or {}).get(RESOLVED_KEY)
        if not resolved:
            return None
        policy, budget, module = resolved
        return cls(policy, budget, module or None)


def resolve_request(
    settings: EngineSettings | None, extra_args: dict | None, num_prompt: int, hf_config
) -> RequestEviction | None:
    """The eviction a request gets (None: its prompt is kept whole); SettingsError if it asks for
    something the engine cannot do."""
    asked = {key[len(REQUEST_PREFIX) :]: value for key, value in (extra_args or {}).items() if key in REQUEST_KEYS}
    unknown = sorted(k for k in (extra_args or {}) if k.startswith(REQUEST_PREFIX) and k not in REQUEST_KEYS)
    if unknown:
        raise SettingsError(f"unknown eviction options {unknown}; known: {list(REQUEST_KEYS)}", unknown[0])
    if settings is None:
        if asked:
            raise SettingsError(
                "this engine was started without LookaheadKV eviction; start it with "
                f'--additional-config \'{{"{CONFIG_KEY}": {{"policy": "lookaheadkv", "budget": 128}}}}\'',
                REQUEST_PREFIX + next(iter(asked)),
            )
        return None
    policy = asked.get("policy", settings.policy)
    _check_policy(policy, REQUEST_PREFIX + "policy")
    if policy == FULL:
        return None
    rules = POLICIES[policy]
    module = None  # checked even for a prompt that fits: a bad module is an error either way
    if rules.lookahead:
        path = asked.get("module", settings.module)
        try:
            module = str(shipped_module(hf_config) if path is None else check_module(path, hf_config))
        except ValueError as error:
            raise SettingsError(str(error), REQUEST_PREFIX + "module") from None
    budget = asked.get("budget", settings.budget)
    if budget is None:
        raise SettingsError(f"policy {policy!r} needs a budget (lookaheadkv_budget)", REQUEST_PREFIX + "budget")
    try:
        entries = resolve_budget(budget, num_prompt)
    except ValueError as error:
        raise SettingsError(str(error), REQUEST_PREFIX + "budget") from None
    if entries >= num_prompt:
        return None  # the prompt fits: nothing to evict
    floor = rules.always_kept(num_prompt)
    if entries < floor:
        tail = num_prompt - rules.num_scored(num_prompt)
        kept = f"{floor - tail} sinks" + (f" + a {tail}-token window" if tail else "")
        raise SettingsError(
            f"budget {budget!r} is below the {floor} entries per layer {policy} always keeps of this "
            f"{num_prompt}-token prompt ({kept}): raise the budget",
            REQUEST_PREFIX + "budget",
        )
    return RequestEviction(policy, entries, module)


def _check_policy(policy, parameter: str) -> None:
    if policy not in policy_names():
        raise SettingsError(f"unknown eviction policy {policy!r}; choose one of {policy_names()}", parameter)
