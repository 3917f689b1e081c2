"""Per-model token prices and the cost of one call.

A pricing table maps model names to USD per million tokens::

    {"models": {"gpt-4o": {"input": 2.5, "output": 10.0, "cache_read": 1.25}}}

as a YAML or JSON file, or the same mapping in Python (with or without the ``models`` wrapper). ``cache_read`` and
``cache_creation`` default to the ``input`` price, ``cache_creation_1h`` (writes to Anthropic's one-hour cache) to the
``cache_creation`` price. ``input_audio`` and ``input_image`` (the prices of the input's audio and image tokens, which
OpenAI lists apart from its text tokens) default to the ``input`` price, ``output_audio`` and ``output_image`` to the
``output`` price. A model matches its own entry, or else the longest entry that is a
prefix of it followed by ``-``, so ``gpt-4o-2024-08-06`` is priced as ``gpt-4o``. In the embedded default table only a
snapshot's suffix counts (a date, ``-0613``, ``-latest``): a family's other models (``o3-mini``, ``o3-pro``,
``gpt-4o-audio-preview``) have prices of their own, and a model it lacks is counted as unpriced, never priced as
another.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from .config import ConfigurationError
from .record import LLMCall, SubUsage

#: The date the embedded default table was taken from the providers' public price lists.
DEFAULT_PRICING_DATE: Final = "2025-10-15"

#: USD per million tokens. A starting point: pass your own table for the prices you actually pay. Anthropic's cache
#: writes cost 1.25 times the input price for its five-minute cache and twice it for its one-hour one. Not in it:
#: OpenAI's flex and priority tiers, Anthropic's long-context price (prompts over 200 K tokens), audio and image models
#: (a table of one's own prices their tokens, each modality at its own price: ``input_audio`` and the rest).
DEFAULT_PRICING: Final[dict[str, dict[str, float]]] = {
    "gpt-5": {"input": 1.25, "output": 10.00, "cache_read": 0.125},
    "gpt-5-mini": {"input": 0.25, "output": 2.00, "cache_read": 0.025},
    "gpt-5-nano": {"input": 0.05, "output": 0.40, "cache_read": 0.005},
    "gpt-4o": {"input": 2.50, "output": 10.00, "cache_read": 1.25},
    # The first gpt-4o snapshot kept its launch price (and had no cached-input price).
    "gpt-4o-2024-05-13": {"input": 5.00, "output": 15.00},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60, "cache_read": 0.075},
    "gpt-4.1": {"input": 2.00, "output": 8.00, "cache_read": 0.50},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60, "cache_read": 0.10},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40, "cache_read": 0.025},
    "o3": {"input": 2.00, "output": 8.00, "cache_read": 0.50},
    "o3-pro": {"input": 20.00, "output": 80.00},
    "o3-mini": {"input": 1.10, "output": 4.40, "cache_read": 0.55},
    "o4-mini": {"input": 1.10, "output": 4.40, "cache_read": 0.275},
    "text-embedding-3-small": {"input": 0.02, "output": 0.0},
    "text-embedding-3-large": {"input": 0.13, "output": 0.0},
    "claude-opus-4": {"input": 15.00, "output": 75.00, "cache_read": 1.50, "cache_creation": 18.75,
                      "cache_creation_1h": 30.00},
    "claude-opus-4-1": {"input": 15.00, "output": 75.00, "cache_read": 1.50, "cache_creation": 18.75,
                        "cache_creation_1h": 30.00},
    "claude-sonnet-4": {"input": 3.00, "output": 15.00, "cache_read": 0.30, "cache_creation": 3.75,
                        "cache_creation_1h": 6.00},
    "claude-sonnet-4-5": {"input": 3.00, "output": 15.00, "cache_read": 0.30, "cache_creation": 3.75,
                          "cache_creation_1h": 6.00},
    "claude-haiku-4-5": {"input": 1.00, "output": 5.00, "cache_read": 0.10, "cache_creation": 1.25,
                         "cache_creation_1h": 2.00},
    "claude-3-5-haiku": {"input": 0.80, "output": 4.00, "cache_read": 0.08, "cache_creation": 1.00,
                         "cache_creation_1h": 1.60},
}  # fmt: skip

_KINDS: Final = (
    "input",
    "output",
    "cache_read",
    "cache_creation",
    "cache_creation_1h",
    "input_audio",
    "input_image",
    "output_audio",
    "output_image",
    "cache_read_image",
)
#: The highest price a table may give, in USD per million tokens: a dollar a token, over 13,000 times the dearest price
#: of the embedded table (Claude Opus 4's output, $75). It bounds the cost counter's running sum: a count read from an
#: answer is at most 2**53 (``apis._MAX_COUNT``), and a call prices at most 776 such counts at one price each (four of
#: its own, four of each of up to 64 advisor consultations and of the image tool, two of each of up to 256 SVG
#: images), so a call costs at most 7e18 dollars, and ``llm_cost_usd_total`` would take over 1e289 calls to reach a
#: float's largest value (1.8e308). A finite price past any provider's (1.7e308) let it reach infinity in 16,500
#: calls, after which its series was gone from every scrape.
MAX_PRICE: Final = 1_000_000.0
#: What follows a model's name in the name of one of its snapshots: a date (``2024-08-06``, ``20250514``), a month and
#: day (``0613``), or ``latest``; Anthropic's ``-0`` names the first version of a family (``claude-sonnet-4-0``).
_SNAPSHOT: Final = re.compile(r"(?:0-)?(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)|0")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_read: float
    cache_creation: float
    cache_creation_1h: float
    #: The input's and the output's audio and image tokens (the usage's details count them apart); each the plain
    #: ``input`` or ``output`` price unless the table gives one.
    input_audio: float
    input_image: float
    output_audio: float
    output_image: float
    #: The cached image tokens among ``cache_read``'s (the Responses API's image generation tool reports them apart:
    #: ``cached_tokens_details.cached_image_tokens``); the plain ``cache_read`` price unless the table gives one.
    cache_read_image: float


class PricingTable:
    """Looks up prices by model and computes the cost of a call.

    Args:
        source: a path to a YAML/JSON file, a mapping, or None for the embedded default table.

    Example::

        table = PricingTable({"my-model": {"input": 1.0, "output": 2.0}})
        table.price("my-model-2025")   # Price(input=1.0, output=2.0, ...)
    """

    def __init__(self, source: str | Path | Mapping[str, Any] | None = None) -> None:
        raw: Any
        #: What an error names: the file, or the table given as a mapping (never its content, which may be large).
        where = "pricing table"
        if source is None:
            raw = DEFAULT_PRICING
        elif isinstance(source, Mapping):
            raw = source
        else:
            where = f"pricing file {str(source)!r}"
            raw = _load_file(Path(source))
        if isinstance(raw, Mapping) and "models" in raw:
            if not isinstance(raw["models"], Mapping):
                raise ConfigurationError(
                    f"{where}: 'models' must map model names to prices, like"
                    " {models: {gpt-4o: {input: 2.5, output: 10}}}"
                )
            raw = raw["models"]
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"{where}: expected a mapping of model names to prices")
        try:
            self._prices = {str(model): _price(str(model), entry) for model, entry in raw.items()}
        except ConfigurationError as error:
            if source is None or isinstance(source, Mapping):
                raise
            # A file's error names the file ("pricing for 'gpt-4o'" alone did not say which table was wrong).
            raise ConfigurationError(f"{where}: {error}") from None
        self._cache: dict[str, Price | None] = {}
        #: The embedded table lists families' models by name: a longer name is another model unless it is a snapshot.
        self._snapshots_only = source is None

    def __len__(self) -> int:
        return len(self._prices)

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._prices.get(model)
        if found is None:
            best = ""
            for name in self._prices:
                if model.startswith(name + "-") and len(name) > len(best):
                    if self._snapshots_only and not _SNAPSHOT.fullmatch(model, len(name) + 1):
                        continue
                    best = name
            found = self._prices.get(best) if best else None
        if len(self._cache) < 4096:
            self._cache[model] = found
        return found

    def cost(self, call: LLMCall) -> float | None:
        """USD for the call's tokens, or None when the model has no price or no tokens are known. The sub-inferences
        other models ran for it (:func:`sub_usages`: Anthropic's advisor tool, the Responses API's image generation
        tool, the authors of SVG images) are added at their own model's price; those of a model without one are left
        out (:meth:`unpriced_sub_tokens`)."""
        if call.input_tokens is None and call.output_tokens is None:
            return None
        price = self.price(call.response_model or call.request_model) or self.price(call.request_model)
        if price is None:
            return None
        audio, image, audio_out, image_out = (
            call.input_audio_tokens,
            call.input_image_tokens,
            call.output_audio_tokens,
            call.output_image_tokens,
        )
        # (Text alone, as most calls: priced without the modalities' terms.)
        modal: tuple[()] | tuple[tuple[int, int], tuple[int, int]] = ()
        if audio or image or audio_out or image_out:
            modal = ((audio or 0, image or 0), (audio_out or 0, image_out or 0))
        cost = _tokens_cost(
            price,
            call.input_tokens or 0,
            call.cache_read_tokens or 0,
            call.cache_creation_tokens or 0,
            call.cache_creation_1h_tokens or 0,
            call.output_tokens or 0,
            *modal,
        )
        if call.advisor_usage or call.image_tool_usage is not None or call.svg_usage is not None:
            for model, counts in sub_usages(call):
                sub = self.price(model)
                if sub is not None:
                    cost += _tokens_cost(sub, *counts)
        # (Finite: no price is over MAX_PRICE and no count over 2**53, so a call costs at most 7e18 dollars.)
        return cost

    def unpriced_sub_tokens(self, call: LLMCall, priced: bool) -> int:
        """The tokens of the call's sub-inferences (:func:`sub_usages`) that :meth:`cost` left out: all of them when
        the call was not ``priced``, else those whose model has no price (or is not known)."""
        return sum(c[0] + c[4] for model, c in sub_usages(call) if not priced or self.price(model) is None)


def sub_usages(call: LLMCall) -> list[tuple[str | None, SubUsage]]:
    """The sub-inferences other models ran for ``call``, each billed at its own model's prices and left out of the
    call's own tokens: the consultations of Anthropic's advisor tool (each its entry's ``model``), the Responses
    API's image generation tool (the model the request's tool names; None, priced as no model, when it names none) and
    the writing of each SVG image, the images API's or the Responses API's (the ``model`` its ``svg_usage`` names)."""
    subs: list[tuple[str | None, SubUsage]] = [
        (model, (*counts, _NO_PARTS, _NO_PARTS, 0)) for model, counts in call.advisor_usage or ()
    ]
    if call.image_tool_usage is not None:
        subs.append((call.image_tool_model, call.image_tool_usage))
    if call.svg_usage is not None:
        subs.extend(call.svg_usage.values())
    return subs


#: No audio and no image tokens: the default of ``_tokens_cost``'s parts, which it prices without their terms.
_NO_PARTS: Final = (0, 0)


def _tokens_cost(
    price: Price,
    tokens: int,
    cache_read: int,
    cache_creation: int,
    one_hour: int,
    output: int,
    modal_input: tuple[int, int] = _NO_PARTS,
    modal_output: tuple[int, int] = _NO_PARTS,
    cached_image: int = 0,
) -> float:
    """USD for ``tokens`` of input (``cache_read`` and ``cache_creation`` among them, ``one_hour`` of the latter) and
    ``output`` tokens at ``price``; ``modal_input`` and ``modal_output`` are the (audio, image) tokens among the input
    and the output, each at its modality's price. Each such count is a part of a total and is taken as at most what is
    left of it: the input's audio, then its image tokens, of its fresh input (the tokens neither read from nor written
    to a cache: a cache read is priced at ``cache_read`` whatever it holds), the output's audio, then image tokens, of
    the output. ``cached_image`` is the image tokens among the cache reads, at the ``cache_read_image`` price, taken as
    at most ``cache_read`` (read only with the parts given: a sub-inference's usage, see :data:`record.SubUsage`). So a
    usage that says more audio tokens than prompt tokens prices no more tokens than it reported, each term is at least
    zero, and so is the cost."""
    fresh = max(tokens - cache_read - cache_creation, 0)
    writes = cache_creation * price.cache_creation
    if one_hour:  # (Anthropic's one-hour cache: part of the writes, at a price of its own)
        one_hour = min(one_hour, cache_creation)
        writes += one_hour * (price.cache_creation_1h - price.cache_creation)
    if modal_input is _NO_PARTS and modal_output is _NO_PARTS:
        # (The sum below with its zero terms left out, which changes no bit of it: a text call's cost, computed in
        # half the instructions.)
        return (fresh * price.input + cache_read * price.cache_read + writes + output * price.output) / 1_000_000
    audio, image = modal_input
    audio = min(audio, fresh)
    image = min(image, fresh - audio)
    audio_out, image_out = modal_output
    audio_out = min(audio_out, output)
    image_out = min(image_out, output - audio_out)
    reads = cache_read * price.cache_read
    if cached_image:
        cached_image = min(cached_image, cache_read)
        reads += cached_image * (price.cache_read_image - price.cache_read)
    return (
        (fresh - audio - image) * price.input
        + audio * price.input_audio
        + image * price.input_image
        + reads
        + writes
        + (output - audio_out - image_out) * price.output
        + audio_out * price.output_audio
        + image_out * price.output_image
    ) / 1_000_000


def _load_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"pricing file {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        # (A ValueError, not an OSError: it escaped the middleware's startup check and its constructor raised it.)
        raise ConfigurationError(
            f"pricing file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from exc
    return parse_pricing_text(text, str(path))


def parse_pricing_text(text: str, name: str) -> Any:
    """The document of a pricing file named ``name`` (JSON when it ends in ``.json``, else YAML), as read from it."""
    is_json = name.endswith(".json")
    try:
        if is_json:
            return json.loads(text)
        # A YAML error's position names the file, not PyYAML's "<unicode string>".
        loader = yaml.SafeLoader(text)
        loader.name = name
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()  # type: ignore[no-untyped-call]
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"pricing file {name!r} is not valid {'JSON' if is_json else 'YAML'}: {exc}") from exc
    except RecursionError as exc:
        # (Escaped the startup check as well: a document nested thousands deep is no pricing table.)
        raise ConfigurationError(f"pricing file {name!r}: nested too deeply to be a pricing table") from exc


#: How a wrong value of a pricing entry is shown in an error: a few members, a few levels deep. Its full repr() of a
#: value built of YAML aliases (a 609-byte file whose price was nine levels of ten aliases each) grew to billions of
#: members and the constructor ran out of memory instead of naming the file.
_SHOWN: Final = reprlib.Repr()
_SHOWN.maxlevel = 2
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxfrozenset = 4
_SHOWN.maxstring = _SHOWN.maxother = 40


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite float. An integer too large for a float (a YAML or JSON price of 400 digits) is
    not: math.isfinite() raised OverflowError on it, out of the middleware's constructor."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _price(model: str, entry: Any) -> Price:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"pricing for {model!r}: expected a mapping like {{input: 2.5, output: 10}}")
    unknown = set(entry) - set(_KINDS)
    if unknown:
        # Sorted as text: YAML keys may be numbers or null beside text, which sorted() alone raised TypeError on.
        shown = ", ".join(_SHOWN.repr(key) for key in sorted(unknown, key=repr)[:10]) + (
            ", ..." if len(unknown) > 10 else ""
        )
        raise ConfigurationError(f"pricing for {model!r}: unknown keys [{shown}]; allowed: {list(_KINDS)}")
    values: dict[str, float] = {}
    for kind in _KINDS:
        value = entry.get(kind)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or value < 0:
            raise ConfigurationError(
                f"pricing for {model!r}: {kind} must be a non-negative number, got {_SHOWN.repr(value)}"
            )
        if value > MAX_PRICE:
            raise ConfigurationError(
                f"pricing for {model!r}: {kind} is {float(value)!r} USD per million tokens, more than any provider"
                f" charges; at most {MAX_PRICE:,.0f} (a dollar a token)"
            )
        values[kind] = float(value)
    if "input" not in values or "output" not in values:
        raise ConfigurationError(f"pricing for {model!r}: input and output prices are required")
    cache_creation = values.get("cache_creation", values["input"])
    cache_read = values.get("cache_read", values["input"])
    return Price(
        input=values["input"],
        output=values["output"],
        cache_read=cache_read,
        cache_creation=cache_creation,
        cache_creation_1h=values.get("cache_creation_1h", cache_creation),
        input_audio=values.get("input_audio", values["input"]),
        input_image=values.get("input_image", values["input"]),
        output_audio=values.get("output_audio", values["output"]),
        output_image=values.get("output_image", values["output"]),
        cache_read_image=values.get("cache_read_image", cache_read),
    )
