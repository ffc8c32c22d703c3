"""Edit-request normalisation shared by every method's ``apply``.

EasyEdit passes a list of one request dict, but in sequential mode a *bare dict*; datasets may
pass any number. :func:`normalize_requests` turns all of these into a list of fresh dicts and
checks the fields every method needs (``prompt``, ``target``, ``image``), naming the request
index and the field in the error. Optional fields of our own datasets (``text_only_prompt``,
``image_only_prompt``, ``portability``, ``fine_locality``) are read through helpers that treat an
empty string (or empty list) as absent, because EasyEdit's dataset loaders fill missing fields
with ``""``.

Before an edit, :func:`check_tokens` makes sure the model can read every text field:
:func:`check_spellable` rejects a word the tokenizer maps to its unknown token (two targets that
both become ``[UNK]`` would be the same edit) and a blank field; :func:`check_context` rejects a
prompt longer than the model's context.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from mke_hooks.errors import RequestError
from mke_plugins.adapters.base import Query, VLMAdapter

REQUIRED_FIELDS = ("prompt", "target", "image")
EXTENDED_FIELDS = ("text_only_prompt", "image_only_prompt", "portability", "fine_locality")
#: other image-valued fields EasyEdit may put in a request (validated when an adapter is given)
IMAGE_FIELDS = ("image", "image_rephrase", "multimodal_locality_image")

#: text fields a model reads, each with the answer it is scored on (None: the field is an answer)
TEXT_FIELDS: dict[str, str | None] = {
    "prompt": "target", "target": None, "rephrase_prompt": "target", "text_only_prompt": "target",
    "image_only_prompt": "target", "locality_prompt": "locality_ground_truth", "locality_ground_truth": None,
    "multimodal_locality_prompt": "multimodal_locality_ground_truth", "multimodal_locality_ground_truth": None,
}
PROBE_FIELDS = ("portability", "fine_locality")

__all__ = ["EXTENDED_FIELDS", "REQUIRED_FIELDS", "RequestError", "check_context", "check_spellable", "check_tokens",
           "context_limit", "fine_locality", "get_field", "image_only_prompt", "normalize_requests", "portability",
           "query_of", "text_only_prompt"]


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


def normalize_requests(requests: Any, adapter: VLMAdapter | None = None, *,
                       require_image: bool = False) -> list[dict[str, Any]]:
    """A list of shallow-copied request dicts, checked.

    ``prompt`` and ``target`` must be non-empty strings, the ``image`` key must exist (its value
    may be ``None`` for a text-only request unless ``require_image``). With ``adapter``, image
    fields are type-checked for the family.
    """
    if isinstance(requests, Mapping):
        items: Sequence[Any] = [requests]
    elif isinstance(requests, (list, tuple)):
        items = requests
    else:
        raise RequestError(f"requests must be a dict or a list of dicts, got {type(requests).__name__}")
    if len(items) == 0:
        raise RequestError("requests is an empty list; pass at least one request dict")
    out = []
    for i, req in enumerate(items):
        if not isinstance(req, Mapping):
            raise RequestError(f"must be a dict, got {type(req).__name__}", index=i)
        for key in ("prompt", "target"):
            if key not in req:
                raise RequestError("is missing (every request needs prompt, target and image)", field=key, index=i)
            value = req[key]
            if not isinstance(value, str):
                raise RequestError(f"must be a string, got {type(value).__name__}", field=key, index=i)
            if not value.strip():
                raise RequestError("is empty", field=key, index=i)
        if "image" not in req:
            raise RequestError("is missing (use image=None for a text-only request)", field="image", index=i)
        if require_image and req["image"] is None:
            raise RequestError("is None, but this method needs an image", field="image", index=i)
        if adapter is not None:
            for key in IMAGE_FIELDS:
                if key in req and req[key] is not None and not (isinstance(req[key], str) and not req[key]):
                    try:
                        adapter.validate_image(req[key], field=key)
                    except RequestError as err:
                        raise RequestError(str(err).split(": ", 1)[-1], field=key, index=i) from None
        out.append(dict(req))
    return out


def get_field(request: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """``request[name]``, or ``default`` when missing, ``None`` or empty."""
    value = request.get(name)
    return default if _absent(value) else value


def text_only_prompt(request: Mapping[str, Any]) -> str | None:
    return get_field(request, "text_only_prompt")


def image_only_prompt(request: Mapping[str, Any]) -> str | None:
    return get_field(request, "image_only_prompt")


def _probe_list(request: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    value = get_field(request, name, [])
    if isinstance(value, Mapping):
        value = [value]
    out = []
    for j, item in enumerate(value):
        if not isinstance(item, Mapping) or "prompt" not in item or "answer" not in item:
            raise RequestError(f"item {j} must be a dict with 'prompt' and 'answer' (and optional 'image')",
                               field=name)
        out.append(dict(item))
    return out


def portability(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The request's portability probes: ``[{prompt, answer, image?}]`` (empty when absent)."""
    return _probe_list(request, "portability")


def fine_locality(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The request's fine-grained locality probes: ``[{prompt, answer, image?}]`` (empty when absent)."""
    return _probe_list(request, "fine_locality")


def query_of(request: Mapping[str, Any]) -> Query:
    """The edit's own teacher-forced query."""
    return Query(image=request.get("image"), prompt=request["prompt"], target=request["target"])


# -- can the model read it? ------------------------------------------------------------------------
def _text_tokenizer(tok: Any) -> Any:
    """The text tokenizer of an HF processor (``.tokenizer``), or ``tok`` itself."""
    inner = getattr(tok, "tokenizer", None)
    return inner if inner is not None and callable(inner) else tok


def _request_dicts(requests: Any) -> list[tuple[int, Mapping[str, Any]]]:
    """``(index, request)`` of the dicts in ``requests``; anything else is left to :func:`normalize_requests`."""
    if isinstance(requests, Mapping):
        requests = [requests]
    if not isinstance(requests, (list, tuple)):
        return []
    return [(i, r) for i, r in enumerate(requests) if isinstance(r, Mapping)]


def text_fields(request: Mapping[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """``(field, text, answer)`` of every non-empty text field, probes as ``portability[j].prompt``."""
    for key, answer_key in TEXT_FIELDS.items():
        text = request.get(key)
        if isinstance(text, str) and text:
            answer = request.get(answer_key) if answer_key else None
            yield key, text, answer if isinstance(answer, str) else None
    for key in PROBE_FIELDS:
        items = request.get(key)
        items = [items] if isinstance(items, Mapping) else items
        for j, item in enumerate(items if isinstance(items, (list, tuple)) else []):
            if not isinstance(item, Mapping):
                continue
            prompt, answer = item.get("prompt"), item.get("answer")
            answer = answer if isinstance(answer, str) else None
            if isinstance(prompt, str) and prompt:
                yield f"{key}[{j}].prompt", prompt, answer
            if answer:
                yield f"{key}[{j}].answer", answer, None


def _encode(tokenizer: Any, text: str, offsets: bool = False) -> Any:
    kwargs: dict[str, Any] = {"add_special_tokens": False}
    if offsets:
        kwargs["return_offsets_mapping"] = True
    try:
        return tokenizer(text, verbose=False, **kwargs)
    except TypeError:  # a tokenizer without the `verbose` keyword
        return tokenizer(text, **kwargs)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(_encode(tokenizer, text)["input_ids"])


def unknown_words(tok: Any, text: str) -> list[str]:
    """The words of ``text`` that ``tok`` maps to its unknown token (none without an unk token)."""
    tokenizer = _text_tokenizer(tok)
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    if unk_id is None or unk_id not in _ids(tokenizer, text):
        return []
    if getattr(tokenizer, "is_fast", False):
        enc = _encode(tokenizer, text, offsets=True)
        spans = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=False) if i == unk_id]
    else:  # slow tokenizers have no offsets: look word by word
        spans = [w for w in text.split() if unk_id in _ids(tokenizer, w)]
    # the unk token's own text (e.g. OPT's "</s>") written in a prompt is not an unknown word
    return list(dict.fromkeys(w for w in spans if w and (unk is None or unk not in w)))


def check_spellable(requests: Any, tok: Any) -> None:
    """Every text field of every request tokenises, without the unknown token.

    A word the tokenizer cannot spell becomes ``[UNK]``: the edit would "succeed", and two
    different targets would be the same edit. Raises :class:`RequestError` naming the request
    index, the field and the word. Tokenizers without an unk token (byte-level BPE) never fail;
    ``tok`` may be a tokenizer or an HF processor with a ``.tokenizer``.
    """
    tokenizer = _text_tokenizer(tok)
    for i, request in _request_dicts(requests):
        for field, text, _ in text_fields(request):
            if not text.strip():
                raise RequestError(f"is blank ({text!r}); write the text or leave the field out",
                                   field=field, index=i)
            words = unknown_words(tokenizer, text) if callable(tokenizer) else []
            if words:
                raise RequestError(f"the tokenizer cannot spell {', '.join(map(repr, words))} (it becomes the "
                                   f"unknown token {tokenizer.unk_token!r}); use words in the model's "
                                   f"vocabulary", field=field, index=i)


def context_limit(model: Any) -> tuple[int, str] | None:
    """``(positions, where)``: the model's context length from its config, or None when it has none."""
    owners = [("config", getattr(model, "config", None))]
    owners.insert(0, ("config.text_config", getattr(owners[0][1], "text_config", None)))
    for sub in ("opt_model", "llama_model", "language_model"):  # LAVIS wrappers
        owners.append((f"{sub}.config", getattr(getattr(model, sub, None), "config", None)))
    for where, cfg in owners:
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{where}.{attr}"
    return None


def check_context(requests: Any, tok: Any, model: Any) -> None:
    """Every prompt, with the answer it is scored on, fits the model's context.

    Counts text tokens only (images and the chat template take more). Raises
    :class:`RequestError` naming the request index, the field, the count and the limit; does
    nothing when the model's config states no limit or ``tok`` is not a tokenizer.
    """
    limit = context_limit(model)
    tokenizer = _text_tokenizer(tok)
    if limit is None or not callable(tokenizer):
        return
    positions, where = limit
    for i, request in _request_dicts(requests):
        for field, text, answer in text_fields(request):
            n = len(_ids(tokenizer, text)) + (len(_ids(tokenizer, answer)) if answer else 0)
            if n > positions:
                with_answer = " with its answer" if answer else ""
                raise RequestError(f"is {n} tokens{with_answer}, more than the model's context of {positions} "
                                   f"positions ({where}); shorten it", field=field, index=i)


def check_tokens(requests: Any, tok: Any, model: Any = None) -> None:
    """:func:`check_spellable`, then (with ``model``) :func:`check_context`: call before the first edit."""
    check_spellable(requests, tok)
    if model is not None:
        check_context(requests, tok, model)
