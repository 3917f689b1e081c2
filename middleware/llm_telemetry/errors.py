"""Map failures to the small fixed set of ``error.type`` values (see ``instruments.ERROR_TYPES``)."""

from __future__ import annotations

import re
from typing import Any, Final

_CONTEXT_LENGTH_HINTS: Final = (
    "context_length",
    "context length",
    "prompt is too long",
    "maximum context",
    "too many tokens",
    "context size",
    "context limit",  # Anthropic's: "input length and `max_tokens` exceed context limit: ..."
    "context window",  # OpenAI's Responses API: "Your input exceeds the context window of this model."
    # Hugging Face TGI's: "`inputs` must have less than 4096 tokens. Given: 5000", "`inputs` tokens +
    # `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`".
    "`inputs` must have less than",
    "`inputs` tokens + `max_new_tokens`",
)
#: Words of a content-filter refusal ("rejected as a result of our safety system", "flagged by moderation"), as words:
#: a parameter named in an invalid-request message (``safety_identifier``) is no refusal.
_CONTENT_FILTER_HINT: Final = re.compile(r"content_filter|content_policy|content policy|\b(?:safety|moderation)\b")

#: Provider error codes and types, lower-cased, to error.type.
_CODES: Final = {
    "context_length_exceeded": "context_length",
    "exceed_context_size_error": "context_length",  # llama.cpp's server
    "string_above_max_length": "context_length",
    "request_too_large": "context_length",
    "content_filter": "content_filter",
    "content_policy_violation": "content_filter",
    "rate_limit_exceeded": "rate_limit",
    "rate_limit_error": "rate_limit",
    "too_many_requests": "rate_limit",
    "insufficient_quota": "rate_limit",
    "billing_error": "rate_limit",  # Anthropic's 402, a spent credit balance: its insufficient_quota
    "tokens": "rate_limit",
    "requests": "rate_limit",
    "overloaded_error": "server_error",
    "api_error": "server_error",
    "server_error": "server_error",
    "internal_error": "server_error",
    "timeout": "timeout",
    "timeout_error": "timeout",
    "authentication_error": "auth",
    "permission_error": "auth",
    "invalid_api_key": "auth",
    "permission_denied": "auth",
    "not_found_error": "not_found",
    "model_not_found": "not_found",
    "invalid_request_error": "invalid_request",
    "throttling_error": "rate_limit",
    "service_unavailable": "server_error",
    "service_unavailable_error": "server_error",
    # OpenAI's refusals of a prompt by policy (its reasoning models answer ``invalid_prompt`` with a 400, and the
    # Responses API fails a response with these codes): the caller's prompt, refused, as a content filter refuses it.
    "invalid_prompt": "content_filter",
    "bio_policy": "content_filter",
    "cyber_policy": "content_filter",
    "misalignment_policy_violation": "content_filter",
    "image_content_policy_violation": "content_filter",
    # The images API's refusal of a prompt or an input image by its moderation (a 400, or an ``error`` event of an
    # image stream, ``type`` ``image_generation_user_error``): a content filter's, whatever words its message uses.
    "moderation_blocked": "content_filter",
    # The Responses API's failures of what the caller sent (its ResponseError codes): an image it cannot use, a
    # request its project's data residency does not allow.
    "data_residency_mismatch": "invalid_request",
    "invalid_image": "invalid_request",
    "invalid_image_format": "invalid_request",
    "invalid_base64_image": "invalid_request",
    "invalid_image_url": "invalid_request",
    "invalid_image_mode": "invalid_request",
    "image_too_large": "invalid_request",
    "image_too_small": "invalid_request",
    "image_parse_error": "invalid_request",
    "image_file_too_large": "invalid_request",
    "image_file_not_found": "invalid_request",
    "empty_image_file": "invalid_request",
    "unsupported_image_media_type": "invalid_request",
    "failed_to_download_image": "invalid_request",
    "vector_store_timeout": "timeout",
}


def classify_status(status: int) -> str | None:
    """The error.type a status code implies on its own, or None for a success."""
    if status < 400:
        return None
    if status in (402, 429):
        return "rate_limit"  # 402: a provider's account out of credit (OpenAI says that with a 429)
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status in (408, 504):
        return "timeout"
    if status == 413:
        return "context_length"
    if status == 424:
        return "server_error"  # Failed Dependency: Hugging Face TGI's answer when the generation itself failed
    if status < 500:
        return "invalid_request"
    return "server_error"


def _status_code(value: Any) -> int | None:
    """An HTTP status carried as an error ``code``: gateways such as the LiteLLM proxy send ``"429"`` or 429."""
    if isinstance(value, str) and len(value) == 3 and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
        return value
    return None


#: Error types that name only a broad family (invalid request, server fault) and which gateways put on any error:
#: the LiteLLM proxy sends ``invalid_request_error`` with a 408, 404 or 413, and an Anthropic-shaped ``api_error``
#: with a 408 or 422. When the response's status (or a status carried as the error's code) is known, it says more.
_BROAD: Final = frozenset({"invalid_request_error", "api_error", "server_error", "internal_error"})


def _decisive(status: int | None) -> bool:
    """Whether a status says what failed whatever the message's words: authentication, a missing model, a timeout, a
    rate limit, a server fault. A message may say more of any other 4xx (a 400, 413 or 422 for a prompt too long or
    a refusal, as providers answer them)."""
    return status is not None and (status in (401, 402, 403, 404, 408, 429) or status >= 500)


def classify_error_body(body: dict[str, Any], status: int | None = None, default: str = "other") -> str:
    """Read an OpenAI (``{"error": {"code", "type", "message"}}``) or Anthropic
    (``{"type": "error", "error": {"type", "message"}}``) error body; fall back to the status code, then
    ``default`` (``server_error`` for an error event inside a stream, whose HTTP status said success).

    A specific code or type wins (``context_length_exceeded``, ``rate_limit_error``), then a status that says what
    failed (:func:`_decisive`), then a context-length or content-filter message, then any other status: the
    response's, or one carried as the error's ``code`` (an error event inside a stream, whose response said 200). A
    broad type (``invalid_request_error``, ``api_error``) is used only when there is no status to read. Words
    of a message are a guess: a rate limit saying "too many tokens" (Bedrock's throttling), a 5xx of a gateway whose
    model is named for moderation, are not a long prompt or a refusal, and counted as such they left the
    availability alerts, which leave those two out."""
    error = body.get("error")
    if isinstance(error, str):
        error = {"message": error}  # Hugging Face TGI's and others': the message alone (its kind beside it)
    if isinstance(error, dict):
        broad: str | None = None
        for key in ("code", "type"):
            value = error.get(key)
            if isinstance(value, str) and value.lower() in _CODES:
                if value.lower() in _BROAD:
                    broad = broad or _CODES[value.lower()]
                    continue
                return _CODES[value.lower()]
        if status is None or status < 400:
            status = _status_code(error.get("code"))
        message = error.get("message")
        if isinstance(message, str) and not _decisive(status):
            lowered = message.lower()
            if any(hint in lowered for hint in _CONTEXT_LENGTH_HINTS):
                return "context_length"
            if _CONTENT_FILTER_HINT.search(lowered) is not None:
                return "content_filter"
        if status is not None:
            return classify_status(status) or default
        if broad is not None:
            return broad
    if status is not None:
        return classify_status(status) or default
    return default
