"""Edit-request normalisation shared by every method's ``apply``.

EasyEdit passes a list of one request dict, but in sequential mode a *bare dict*; datasets may
pass any number. :func:`normalize_requests` turns all of these into a list of fresh dicts and
checks the fields every method needs (``prompt``, ``target``, ``image``), naming the request
index and the field in the error. Optional fields of our own datasets (``text_only_prompt``,
``image_only_prompt``, ``portability``, ``fine_locality``) are read through helpers that treat an
empty string (or empty list) as absent, because EasyEdit's dataset loaders fill missing fields
with ``""``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mke_hooks.errors import RequestError
from mke_plugins.adapters.base import Query, VLMAdapter

REQUIRED_FIELDS = ("prompt", "target", "image")
EXTENDED_FIELDS = ("text_only_prompt", "image_only_prompt", "portability", "fine_locality")
#: other image-valued fields EasyEdit may put in a request (validated when an adapter is given)
IMAGE_FIELDS = ("image", "image_rephrase", "multimodal_locality_image")

__all__ = ["EXTENDED_FIELDS", "REQUIRED_FIELDS", "RequestError", "fine_locality", "get_field", "image_only_prompt",
           "normalize_requests", "portability", "query_of", "text_only_prompt"]


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
