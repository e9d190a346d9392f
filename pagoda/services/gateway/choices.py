"""The state of one submitted request's choices in the gateway: each choice's detokenizer, stop
strings, text and counts (`Choice`), what one output adds to a choice (`ChoiceDelta`), and the
sub-request that turns its outputs into those deltas (`SubRequest.process`, and `add_plain` for a
plain stream's direct sink). calls.py runs them for an API call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pagoda.engine import IncrementalDetokenizer, RequestOutput, StopChecker, Tokenizer, TokenLogprob
from pagoda.services.gateway.embeddings import EmbeddingRequest
from pagoda.services.gateway.frontend import Sink, Submitted
from pagoda.services.gateway.protocol import ChatCompletionRequest, CompletionRequest

APIRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest  # what a Call serves


@dataclass
class Choice:
    """Output state of one choice: text so far, tokens, logprobs, how it finished."""

    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    text: str = ""
    num_output_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    engine_finished: bool = False
    last_token_at: float | None = None  # monotonic time of its latest token, for metrics
    embedding: list[float] | None = None  # a pooling request's result

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ChoiceDelta:
    choice: Choice
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


@dataclass
class SubRequest:
    """One submitted request: one prompt and its n choices."""

    request_id: str
    prompt_ids: list[int]
    prompt_text: str  # for echo
    choices: list[Choice]
    outputs: AsyncIterator[RequestOutput]
    num_cached_tokens: int = 0
    released: bool = False
    backlog: Callable[[], bool] | None = None  # Submitted.backlog
    set_sink: Callable[[Sink | None], None] | None = None  # Submitted.set_sink
    include_stop: bool = False  # include_stop_str_in_output: a stop token's text stays in the text

    @classmethod
    def of(
        cls,
        request_id: str,
        submitted: Submitted,
        prompt_text: str,
        req: APIRequest,
        tokenizer: Tokenizer,
        first_index: int,
    ) -> SubRequest:
        ids = submitted.prompt_token_ids
        choices = [
            Choice(
                index=first_index + i,
                detokenizer=IncrementalDetokenizer(tokenizer, ids, req.skip_special_tokens),
                stop=StopChecker(req.stop_strings, req.include_stop_str_in_output),
            )
            for i in range(req.n)
        ]
        return cls(
            request_id,
            list(ids),
            prompt_text,
            choices,
            submitted.outputs,
            backlog=submitted.backlog,
            set_sink=submitted.set_sink,
            include_stop=req.include_stop_str_in_output,
        )

    def process(self, out: RequestOutput) -> ChoiceDelta | None:
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        choice = self.choices[out.index]
        if choice.done:
            return None  # already finished by a stop string; the engine has not noticed yet
        choice.engine_finished = out.finished
        if out.embedding is not None:
            choice.embedding = out.embedding
        new_logprobs = list(out.new_logprobs) if out.new_logprobs else []
        ids = out.new_token_ids
        if out.stop_token_id is not None and ids[-1:] == [out.stop_token_id] and not self.include_stop:
            ids = ids[:-1]  # a stop token is not text (vLLM's rule), with skip_special_tokens off too
        if len(ids) > 1 and choice.stop.stop:
            text, hit, used = choice.stop.add_token_by_token(choice.detokenizer, ids)
        else:
            text, hit = choice.stop.add(choice.detokenizer.add(ids))
            used = len(ids)
        # the tokens after the one a stop string ended in (a stop token included) are not output
        dropped = len(out.new_token_ids) - used if hit is not None else 0
        choice.num_output_tokens = out.num_output_tokens - dropped
        if dropped and new_logprobs:
            new_logprobs = new_logprobs[:used]
        choice.logprobs.extend(new_logprobs)
        if hit is not None:
            choice.finish_reason, choice.stop_reason = "stop", hit
        elif out.finished:
            text += choice.stop.flush()
            choice.finish_reason = out.finish_reason or "stop"
            choice.stop_reason = out.stop_token_id
        choice.text += text
        return ChoiceDelta(choice, text, new_logprobs, choice.finish_reason)

    def add_plain(
        self, choice: Choice, ids: list[int], num_output_tokens: int, num_cached_tokens: int
    ) -> str:
        """What `process` does with an unfinished output without log-probs for a choice without
        stop strings (a plain stream's direct sink, `frontend.Sink`): the text the new tokens
        complete. Such an output has no stop token or embedding, and nothing in it can end the
        choice."""
        if num_cached_tokens > self.num_cached_tokens:
            self.num_cached_tokens = num_cached_tokens
        text = choice.detokenizer.add(ids)
        choice.num_output_tokens = num_output_tokens
        choice.text += text
        return text

    @property
    def engine_finished(self) -> bool:
        return all(c.engine_finished for c in self.choices)
