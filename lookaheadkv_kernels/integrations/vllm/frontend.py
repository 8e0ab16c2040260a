"""API process: each request's eviction settings are checked and resolved as vLLM accepts the request.

A bad setting (unknown policy, a budget below what the policy always keeps, a module for another
model, eviction asked of an engine started without it) raises vLLM's validation error there: the
OpenAI server answers HTTP 400, `LLM.generate` raises, and the engine never sees the request.
"""

from __future__ import annotations

import functools

from .settings import RESOLVED_KEY, SettingsError, engine_settings, resolve_request


def install() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        params = request.sampling_params
        if params is None:
            return request
        extra_args = {k: v for k, v in (params.extra_args or {}).items() if k != RESOLVED_KEY}
        num_prompt = (
            len(request.prompt_token_ids or ()) if request.prompt_embeds is None else len(request.prompt_embeds)
        )
        try:
            eviction = resolve_request(
                engine_settings(self.vllm_config), extra_args, num_prompt, self.model_config.hf_config
            )
        except SettingsError as error:
            raise VLLMValidationError(str(error), parameter=error.parameter) from None
        if eviction is not None:
            extra_args.update(eviction.to_extra_args())
            # In-place compaction needs blocks the request owns alone: no prefix-cache hits.
            params.skip_reading_prefix_cache = True
        params.extra_args = extra_args or None
        return request

    InputProcessor.process_inputs = process_inputs
