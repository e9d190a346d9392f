"""Chat template + tokenization + the checks a prompt must pass (context length, vocabulary,
max_tokens), with the 400s a client gets: used by the tokenizer service and, in one process,
by the gateway's LocalFrontend."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pagoda.engine import SamplingParams, Tokenizer
from pagoda.services.transport.errors import APIError, bad_request
from pagoda.services.transport.messages import PromptInput


class PromptProcessor:
    """Chat template + tokenization + checks, shared by LocalFrontend and the tokenizer service.
    Error messages follow vLLM's."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template applied to `messages` (and `tools`, for a template that renders
        them); a template error is the user's (400)."""
        extra = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, **extra
            )
        except APIError:
            raise
        except Exception as err:  # a template's raise_exception() is about the user's messages
            raise bad_request(f"Could not apply the chat template: {err}", param="messages") from None

    def tokenize(self, prompt: PromptInput) -> list[int]:
        """The prompt's token ids, unchecked (but for template errors), truncated to the last
        `truncate_prompt_tokens` where asked."""
        ids = self._tokenize(prompt)
        keep = prompt.truncate_prompt_tokens
        if keep is not None:
            ids = ids[-(self.max_model_len if keep == -1 else keep) :]
        return ids

    def _tokenize(self, prompt: PromptInput) -> list[int]:
        given = [x is not None for x in (prompt.messages, prompt.text, prompt.token_ids)]
        if sum(given) != 1:
            raise bad_request("Give exactly one of messages, text or token_ids as the prompt.", "prompt")
        if prompt.messages is not None:
            text = self.render_chat(prompt.messages, prompt.add_generation_prompt, prompt.tools)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if prompt.text is not None:
            return self.tokenizer.encode(prompt.text, add_special_tokens=prompt.add_special_tokens)
        assert prompt.token_ids is not None
        return list(prompt.token_ids)

    def check_token_ids(self, ids: Iterable[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        for tid in ids:
            if not 0 <= tid < vocab:
                raise bad_request(f"token id {tid} is out of vocabulary (vocab_size {vocab})", param=param)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Context-length and vocabulary checks of a tokenized prompt and its sampling params."""
        max_len = self.max_model_len
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise bad_request("The prompt is empty; give at least one token.", param="prompt")
        self.check_token_ids(prompt_ids, "prompt")
        if params.pooling is not None:  # an embedding: the whole context is the prompt's
            if n_prompt > max_len:
                raise bad_request(
                    f"This model's maximum context length is {max_len} tokens. However, you requested "
                    f"{n_prompt} tokens in the input for embedding generation. Please reduce the length "
                    "of the input, or set truncate_prompt_tokens.",
                    param="input",
                )
            return
        if n_prompt >= max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, your request has "
                f"{n_prompt} input tokens. Please reduce the length of the input messages."
            )
        if params.max_tokens is not None and n_prompt + params.max_tokens > max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the messages "
                f"or completion.",
                param="max_tokens",
            )
        if params.logit_bias:
            self.check_token_ids(params.logit_bias, "logit_bias")
        if params.stop_token_ids:
            self.check_token_ids(params.stop_token_ids, "stop_token_ids")

    def process(self, prompt: PromptInput, params: SamplingParams) -> list[int]:
        """Token ids of `prompt`, checked against the model: raises APIError(400)."""
        ids = self.tokenize(prompt)
        self.check(ids, params)
        return ids
