"""A reconstruct request's HTTP body, parsed and checked: images (multipart files or base64 in
JSON), optional cameras, the output format and whether to render a turntable.

Two body types are accepted, nothing else (415):

* ``multipart/form-data``: one ``images`` file part per view (in order), and optional text parts
  ``cameras`` (JSON), ``format`` (``ply`` | ``splat``), ``turntable`` (``true`` | ``false``),
  ``viewer`` (``true``: a JSON answer carries the ``.splat`` too, for the page's viewer) and the
  generate model's ``seed``, ``steps``, ``guidance`` (checked by the pipeline: a model that takes
  none of them refuses them).
* ``application/json``: ``{"images": [base64, ...], "cameras": {...} | null, "format": "ply",
  "turntable": false, "viewer": false, "seed": 0, "steps": 30, "guidance": 3.0}``.

Every mistake is a :class:`RequestError` naming the field (``images[2]``, ``cameras``,
``format``, ``content-type``, ``body``). Images are decoded by :func:`fast3d.io.images.read_image`
(pixel and byte limits checked from the header, before any pixel is decoded) and composited over
white, as ``fast3d infer`` reads files. Nothing names a file or a model, nothing is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from dataclasses import field as _field

from torch import Tensor

from fast3d.serving.pipelines import FORMATS, RequestError

MAX_VIEWS = 8            # more image parts than any model takes (LGM 4, Era3D 6) is refused before decoding
PARAMS = ("seed", "steps", "guidance")
FIELDS = ("images", "cameras", "format", "turntable", "viewer", *PARAMS)


@dataclass
class ParsedRequest:
    images: list[Tensor]   # V x [3, H, W] in [0, 1], composited over white
    cameras: dict | None   # decoded JSON, checked by the pipeline
    format: str            # "ply" | "splat"
    turntable: bool
    decode_ms: float = 0.0
    rgba: list[Tensor] = _field(default_factory=list)   # V x [4, H, W]: the images before compositing
    params: dict = _field(default_factory=dict)         # of PARAMS, as given (Pipeline.check_params)
    viewer: bool = False   # a JSON answer also carries the .splat (the page's viewer reads it)


def _flag(value, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise RequestError(field, f"must be true or false; got {value!r}")


def _multipart(content_type: str, body: bytes) -> tuple[list[bytes], dict]:
    """(image parts, text fields) of a multipart/form-data body (the standard library's MIME parser)."""
    import re
    from email import policy
    from email.parser import BytesParser

    # Count the parts before the MIME parser sees them: it spends ~1 ms a part, so a body of tens of
    # thousands of empty parts would hold the replica for a minute.
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if m is None:
        raise RequestError("content-type", "multipart/form-data without a boundary parameter")
    parts = body.count(b"--" + m.group(1).encode("latin-1", "replace")) - 1
    if parts > MAX_VIEWS + len(FIELDS) - 1:
        raise RequestError("body", f"at most {MAX_VIEWS + len(FIELDS) - 1} form parts; got {parts}")
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n"
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or msg.defects:
        raise RequestError("body", "malformed multipart/form-data (missing boundary, truncated or unterminated parts)")
    images, fields = [], {}
    for part in msg.iter_parts():
        if part.defects:
            raise RequestError("body", "malformed multipart/form-data part")
        name = part.get_param("name", header="content-disposition")
        if name not in FIELDS:
            raise RequestError(str(name), f"unknown form field; expected some of {list(FIELDS)}")
        data = part.get_payload(decode=True) or b""
        if name == "images":
            images.append(data)
        elif name in fields:
            raise RequestError(name, "given more than once")
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(name, "must be UTF-8 text") from None
    if "cameras" in fields:
        try:
            fields["cameras"] = json.loads(fields["cameras"]) if fields["cameras"].strip() else None
        except (json.JSONDecodeError, RecursionError) as e:
            raise RequestError("cameras", f"not valid JSON ({type(e).__name__}: {e})") from None
    return images, fields


def _json(body: bytes) -> tuple[list[bytes], dict]:
    try:
        d = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise RequestError("body", f"not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise RequestError("body", f"must be a JSON object with the keys {list(FIELDS)}; got {type(d).__name__}")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown key; expected some of {list(FIELDS)}")
    imgs = d.get("images")
    if not isinstance(imgs, list):
        raise RequestError("images", f"must be a list of base64-encoded image files; got {type(imgs).__name__}")
    if len(imgs) > MAX_VIEWS:
        raise RequestError("images", f"at most {MAX_VIEWS} images; got {len(imgs)}")
    images = []
    for i, s in enumerate(imgs):
        if not isinstance(s, str):
            raise RequestError(f"images[{i}]", f"must be a base64 string; got {type(s).__name__}")
        try:
            images.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"images[{i}]", f"not valid base64 ({e})") from None
    fields = {k: d[k] for k in ("cameras", "format", "turntable", "viewer", *PARAMS) if k in d}
    return images, fields


def parse_request(content_type: str | None, body: bytes, max_pixels: int, max_image_bytes: int) -> ParsedRequest:
    """Parse and check a reconstruct request body (module docstring).

    Args:
        content_type: the Content-Type header (with its parameters), or None.
        body: the whole body, already size-limited.
        max_pixels: the largest width x height of an image.
        max_image_bytes: the largest encoded image.

    Returns:
        The decoded request. RequestError names the field at fault.
    """
    import time

    from fast3d.io.images import composite, read_image

    mime = (content_type or "").split(";")[0].strip().lower()
    if mime == "multipart/form-data":
        raw, fields = _multipart(content_type, body)
    elif mime == "application/json":
        raw, fields = _json(body)
    else:
        raise RequestError("content-type", f"must be multipart/form-data or application/json; got {mime or 'none'!r}",
                           status=415, kind="content_type")
    if not raw:
        raise RequestError("images", "no image given")
    if len(raw) > MAX_VIEWS:
        raise RequestError("images", f"at most {MAX_VIEWS} images; got {len(raw)}")
    fmt = fields.get("format", "ply")
    if fmt not in FORMATS:
        raise RequestError("format", f"must be one of {list(FORMATS)}; got {fmt!r}")
    turntable = _flag(fields.get("turntable", False), "turntable")
    cameras = fields.get("cameras")
    if cameras is not None and not isinstance(cameras, dict):
        raise RequestError("cameras", f"must be a JSON object; got {type(cameras).__name__}")
    t = time.perf_counter()
    rgba = []
    for i, data in enumerate(raw):
        name = f"images[{i}]"
        try:
            rgba.append(read_image(data, name=name, max_pixels=max_pixels, max_bytes=max_image_bytes))
        except ValueError as e:
            raise RequestError(name, str(e).removeprefix(name).lstrip(" :")) from None
    images = [composite(x) for x in rgba]
    return ParsedRequest(images, cameras, fmt, turntable, (time.perf_counter() - t) * 1e3, rgba,
                         {k: fields[k] for k in PARAMS if k in fields}, _flag(fields.get("viewer", False), "viewer"))
