"""What the middleware learns about one LLM request, filled in as the request and response flow by."""

from __future__ import annotations

import dataclasses
from typing import Any, Final, TypeAlias

#: Tool calls whose id (and, for a tool the provider runs itself, its kind) is kept for the span's output messages:
#: as many as a captured message shows.
MAX_TOOL_CALL_IDS: Final = 16
#: Choices whose finish reason is kept apart for the span's ``gen_ai.response.finish_reasons`` (one per choice):
#: OpenAI's ``n`` asks for at most 128. Each is cut to MAX_CHOICE_FINISH_CHARS (the providers' are short words), so
#: an upstream's long ones leave the span small.
MAX_CHOICE_FINISHES: Final = 128
MAX_CHOICE_FINISH_CHARS: Final = 64
#: The operation of the calls that have no first token (image generations and edits, transcriptions: see
#: apis.OpenAIMediaReader), and so no time to first token, per output token or to abandonment.
UNTIMED_OPERATION: Final = "generate_content"
#: The tokens of a sub-inference another model ran for a call, priced at that model's prices: (input, of it cache
#: reads, cache writes, one-hour cache writes, output, the input's (audio, image) tokens, the output's (audio, image)
#: tokens, the image tokens among the cache reads), the arguments of ``pricing._tokens_cost`` after the price.
SubUsage: TypeAlias = tuple[int, int, int, int, int, tuple[int, int], tuple[int, int], int]
#: Most SVG images whose author's tokens a call keeps (a Responses answer's ``image_generation_call`` items, each its
#: own ``svg_usage``): a response makes a few images; those past it are not priced.
MAX_SVG_ITEMS: Final = 256


@dataclasses.dataclass(slots=True)
class ToolResult:
    """A tool result the client sent back to the model in a request."""

    name: str
    is_error: bool


@dataclasses.dataclass(slots=True)
class LLMCall:
    """One LLM API request and its response.

    Times are ``time.perf_counter()`` readings. Token counts are None when neither reported nor estimated.
    ``input_tokens`` includes cached tokens (as the GenAI semantic conventions define it); ``cache_read_tokens``
    and ``cache_creation_tokens`` are parts of it, and ``reasoning_tokens`` is part of ``output_tokens``.
    """

    operation: str
    provider: str
    start: float
    path: str = ""
    request_id: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    #: The other request parameters the GenAI conventions put on the span (None when not sent).
    top_k: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    #: ``n``, only when it asks for more than one choice.
    choice_count: int | None = None
    stop_sequences: tuple[str, ...] | None = None
    #: ``gen_ai.output.type`` of the output format asked for: ``text`` or ``json``.
    output_type: str | None = None
    #: An embeddings request's ``encoding_format`` and ``dimensions``, when sent.
    encoding_format: str | None = None
    dimension_count: int | None = None
    #: The conversation the request belongs to (the Responses API's ``conversation``), when sent.
    conversation_id: str | None = None
    #: OpenAI's ``service_tier`` asked for, the one that served the request, and the response's
    #: ``system_fingerprint`` (the conventions' ``openai.request.service_tier`` and ``openai.response.*``).
    service_tier: str | None = None
    #: (As the body gave them, of any type: a span shows them only when they are strings, bounded.)
    response_service_tier: Any = None
    system_fingerprint: Any = None
    end: float | None = None
    first_token_at: float | None = None
    #: When the middleware learned the client had left (an ``http.disconnect``, or a ``send`` failing for want of a
    #: connection), or None.
    left_at: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    #: Of ``cache_creation_tokens``, those written to a one-hour cache (Anthropic's ``ttl: 1h``), billed higher.
    cache_creation_1h_tokens: int | None = None
    reasoning_tokens: int | None = None
    #: Of ``input_tokens`` and of ``output_tokens``, the audio and the image tokens, as the usage's details count them
    #: (OpenAI's chat ``prompt_tokens_details`` and ``completion_tokens_details``, an image's ``input_tokens_details``,
    #: a transcription's ``input_token_details``; an image's output is its image's): priced at their own modality's
    #: price. Each at most its total, the image tokens at most what the audio tokens leave of it; None when not
    #: reported.
    input_audio_tokens: int | None = None
    input_image_tokens: int | None = None
    output_audio_tokens: int | None = None
    output_image_tokens: int | None = None
    #: Of ``output_tokens``, those of a compaction pass made before the answer (Anthropic's server-side compaction,
    #: which its usage reports apart): never streamed as tokens, so left out of the time per output token.
    compaction_output_tokens: int = 0
    #: The sub-inferences of Anthropic's advisor tool, each run by a model of its own and billed at its price but left
    #: out of the usage's top-level counts (and so of the tokens above): per entry of ``usage.iterations`` of type
    #: ``advisor_message``, its model and its (input, of it cache reads, cache writes, one-hour cache writes, output)
    #: tokens, input counted as above. Priced into ``cost_usd`` by that model. None when there were none.
    advisor_usage: list[tuple[str | None, tuple[int, int, int, int, int]]] | None = None
    #: The tokens of the Responses API's image generation tool (the response's ``tool_usage.image_gen``), run by an
    #: image model of its own, billed at its prices and left out of the response's ``usage`` (and so of the tokens
    #: above): (input, of it cache reads, 0, 0, output, the input's (audio, image) tokens, the output's (audio,
    #: image) tokens, the cached image tokens). Priced into ``cost_usd`` by ``image_tool_model``. None when not
    #: reported.
    image_tool_usage: SubUsage | None = None
    #: The ``model`` the request's ``image_generation`` tool names (None: it names none, and the model that ran it,
    #: which the API chooses, is not known here).
    image_tool_model: str | None = None
    #: The models that wrote SVG images (``output_format: svg``) and their tokens, as each image's ``svg_usage``
    #: reports them apart from the image's own usage, by image: the images API's answer (key 0), or the Responses
    #: API's ``image_generation_call`` items (by item id, else by output index; an answer too large to read whole,
    #: by negative numbers, one a member found in its tail), each (its ``model``, (input, 0, 0, 0, output with its
    #: reasoning, (0, 0), (0, 0), 0)). Keyed so that an item a stream sends twice (its ``response.output_item.done``
    #: event and ``response.completed``) is priced once; at most MAX_SVG_ITEMS. Priced into ``cost_usd`` by each
    #: model. None when none was reported.
    svg_usage: dict[str | int, tuple[str | None, SubUsage]] | None = None
    #: Whether the stream's first token was reasoning (the reasoning is streamed, so its tokens follow that first
    #: token); False when the first token was the answer or a tool call.
    reasoning_shown: bool = False
    #: Whether the stream's output so far is items that came whole (a Responses API item added with nothing streamed
    #: in it after: an MCP approval request, a program, a computer call), their tokens all made before the first
    #: token: no time per output token is measured from them.
    first_output_whole: bool = False
    #: ``input_tokens`` is the middleware's estimate from the request's text (the response reported no usage).
    input_estimated: bool = False
    #: "reported" when the provider's usage block gave the counts, "estimated" when we counted ourselves.
    usage_source: str = "reported"
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    #: Choices a stream's events named (the highest choice index read, plus one; 0 for streams without choices).
    stream_choices: int = 0
    #: Of those, the choices that had output (text, reasoning, a refusal, audio or a tool call).
    output_choices: int = 0
    tool_calls: list[str] = dataclasses.field(default_factory=list)
    #: (id, hosted tool kind or None) of each of the first MAX_TOOL_CALL_IDS of ``tool_calls``; None until one.
    tool_call_ids: list[tuple[str | None, str | None]] | None = None
    #: (tool_use_id, hosted tool kind) of each of the first MAX_TOOL_CALL_IDS results of a tool the provider ran
    #: itself that the answer carries (Anthropic's ``web_search_tool_result`` and the like); None until one.
    server_tool_results: list[tuple[str | None, str]] | None = None
    #: Each choice's finish reason, by choice index (of a finish repeated for one choice, the last), or None.
    choice_finishes: dict[int, str] | None = None
    #: Finishes read of choices past those MAX_CHOICE_FINISHES kept apart (a server that takes ``n`` over 128).
    finishes_beyond: int = 0
    tool_results: list[ToolResult] = dataclasses.field(default_factory=list)
    status_code: int | None = None
    error_type: str | None = None
    cost_usd: float | None = None
    #: ``request_model`` as the metrics' label value it became (bounded in length and in distinct values, ``other``
    #: past them; set by the recorder): the LLM span is named by it, as trace backends index span names.
    model_label: str | None = None
    #: Attribution labels from request headers: {"tenant": "acme"}. The header values as sent ("" for a header
    #: absent or empty) until the recorder has recorded the call; then as recorded, bounded ("none" for "").
    attribution: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Prompt messages and completion text, only kept when content capture is on.
    input_messages: list[dict[str, Any]] | None = None
    #: System instructions given apart from the messages (Anthropic's ``system``, the Responses API's
    #: ``instructions``), only kept when content capture is on.
    system_instructions: Any = None
    #: The generated text of each choice, and each one's finish reason (None: not reported), only kept when content
    #: capture is on.
    output_text: list[str] | None = None
    output_finish_reasons: list[str | None] | None = None
    #: With several output messages: the one (its position in ``output_text``) each of ``tool_calls`` belongs to.
    output_tool_messages: list[int] | None = None
    #: The request's ASGI scope (tracing reads the HTTP server attributes and the caller's trace context).
    scope: Any = None
    #: OpenAI's chat APIs, told apart as the conventions' ``openai.api.type`` does: ``chat_completions`` or
    #: ``responses`` (None for the other APIs).
    api_type: str | None = None
    #: ``scope["root_path"]`` as the request arrived (tracing: what routing adds is a mount's prefix of the route).
    root_path: str = ""
    #: The exception the app raised, when it is the call's failure (``error_type`` ``app_exception``): tracing
    #: records it on the span.
    exception: BaseException | None = None
    #: Free slot for observers (tracing keeps its span here).
    span: Any = None
    #: OpenTelemetry context carrying the LLM span, passed to histogram records so exemplars link to it.
    otel_context: Any = None
    #: Token of ``opentelemetry.context.attach`` while the LLM span is current (tracing detaches it at the end).
    otel_token: Any = None

    def add_tool_call(self, name: str, call_id: Any = None, hosted: str | None = None) -> None:
        """Count a tool call made by the model: ``call_id`` its id, ``hosted`` the kind of a tool the provider runs
        itself (``web_search``, ``code_interpreter``, ...), None for the client's own."""
        self.tool_calls.append(name)
        ids = self.tool_call_ids
        if ids is None:
            ids = self.tool_call_ids = []
        if len(ids) < MAX_TOOL_CALL_IDS:
            ids.append((call_id[:256] if isinstance(call_id, str) else None, hosted))

    def add_server_tool_result(self, call_id: Any, kind: str) -> None:
        """A result of a tool the provider ran itself, in the answer: ``call_id`` the id of its call."""
        results = self.server_tool_results
        if results is None:
            results = self.server_tool_results = []
        if len(results) < MAX_TOOL_CALL_IDS:
            results.append((call_id[:256] if isinstance(call_id, str) else None, kind[:256]))

    def add_choice_finish(self, index: int, reason: str) -> None:
        """A choice's finish reason, up to MAX_CHOICE_FINISHES choices: the last read for each choice kept, as the
        OpenAI SDK's stream accumulator and the LiteLLM proxy's stream builder keep it (a gateway may send an early
        finish for a choice, then its final one)."""
        reason = reason[:MAX_CHOICE_FINISH_CHARS]
        finishes = self.choice_finishes
        if finishes is None:
            self.choice_finishes = {index: reason}
        elif index in finishes or len(finishes) < MAX_CHOICE_FINISHES:
            finishes[index] = reason
        else:
            self.finishes_beyond += 1

    def finished_choices(self, expected: int) -> bool:
        """Whether a finish was read for each of ``expected`` choices, each counted once however often it was sent
        (a gateway may repeat a choice's finish, or send an early one and then its final one); past the choices kept
        apart (MAX_CHOICE_FINISHES), each finish read counts."""
        return len(self.choice_finishes or ()) + self.finishes_beyond >= max(expected, 1)

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start

    @property
    def time_per_output_token(self) -> float | None:
        """Mean gap between output tokens after the first, for streams with at least two output tokens.

        Reasoning tokens that the stream did not show (OpenAI's reasoning models report them in the usage only, as
        Anthropic's do with ``display: omitted``) were generated before its first token, so they are not among the
        tokens after it; nor are those of a compaction pass, made before the answer. With ``n`` choices, which are
        generated side by side, it is per choice: the output of the choices that had any, each taken as an equal
        share (a choice that said nothing made none of it). A stream whose only output came in whole items (no piece
        streamed after the first) has none: their tokens were all made before it."""
        if self.end is None or self.first_token_at is None or not self.output_tokens or self.first_output_whole:
            return None
        tokens: float = self.output_tokens
        if 0 < self.compaction_output_tokens < tokens:
            tokens -= self.compaction_output_tokens
        if self.reasoning_tokens and not self.reasoning_shown and self.reasoning_tokens < tokens:
            # (Not when the usage says more reasoning than output: a provider that counts them apart.)
            tokens -= self.reasoning_tokens
        if self.output_choices > 1:  # (a server that ignores n sends one choice; a batch of prompts, n for each)
            tokens /= self.output_choices
        if tokens < 2:
            return None
        return (self.end - self.first_token_at) / (tokens - 1)
