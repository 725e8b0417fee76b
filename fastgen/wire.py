"""Images over the wire between the page (fastgen.remote) and the Ray Serve app (fastgen.serve): PNG as base64 in
JSON. Its own module, so that the page decodes a panel without importing Ray."""

from __future__ import annotations

import base64
import io


def png64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def from_png64(text: str, field: str = "image"):
    """A base64 PNG (or any image file) sent in a request, or a RequestError naming the field."""
    from PIL import Image, UnidentifiedImageError

    from fastgen.request import RequestError

    if not isinstance(text, str):
        raise RequestError(field, f"`{field}` must be a base64-encoded image file, got {type(text).__name__}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
    except (ValueError, UnidentifiedImageError, OSError):
        raise RequestError(field, f"`{field}` must be a base64-encoded image file (PNG), and could not be read") \
            from None
    return image
