"""Error messages safe to keep: credentials masked, control characters out, length bounded.

Used in two places with the same rules: the shim, before a message leaves the
service (the shim's sender runs :func:`safe_message` on every event's
``error_message``, whether it came from ``error``, ``timeout``, ``retry``, a
failed ``Call`` or the tenacity adapter, which pass ``str(exc)``, or from
``emit()``), and the worker, on every event it keeps for the databases,
because producers that do not use the shim exist. Applying it twice changes
nothing.

Masked (replaced by ``***``; everything else is kept as it was):

- the password of a URL's user info: ``postgresql://u:secret@h/db`` ->
  ``postgresql://u:***@h/db`` (up to the token's last ``@``, so an unencoded
  ``@`` in the password does not leak its tail);
- bearer tokens and ``Authorization`` header values: ``Bearer abc.def`` ->
  ``Bearer ***``, ``Authorization: Basic dXNlcg==`` -> ``Authorization: Basic ***``;
- JSON web tokens (``eyJ....``) wherever they stand;
- the value of a ``key=value`` or ``key: value`` pair whose key ends in a
  credential word: ``password``, ``passwd``, ``pwd``, ``secret``, ``token``,
  ``api_key`` (``apikey``, ``api-key``), ``access_key``, ``secret_key``,
  ``private_key``, ``credential(s)``, ``session_id``, ``cookie``, with any
  prefix (``db_password``, ``X-Api-Key``, ``access_token``); a quoted value
  keeps its quotes (``"password": "***"``).

Then runs of control characters (C0, DEL, C1: newlines, tabs, terminal escape
sequences) become one space, the ends are stripped, and the result is cut to
:data:`MAX_MESSAGE_CHARS` characters (the last one ``…`` when cut), which is
what wire format v1 accepts in ``error_message``. Masking runs before the cut,
so a cut never splits a secret into something the rules no longer recognise.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "MAX_MESSAGE_CHARS", "redact", "safe_message", "text_of"]

MAX_MESSAGE_CHARS: Final = 1024
"""Longest ``error_message`` (characters) the wire format accepts and the shim sends."""
MASK: Final = "***"
_SCAN_CHARS: Final = 16 * MAX_MESSAGE_CHARS
"""Longest input the masking rules look at: a longer message is first cut at the last
whitespace before this (never inside a token, which might hide a secret's end), since only
its start is kept anyway; one without any whitespace there is left out, saying so."""

_URL_PASSWORD = re.compile(
    r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)\S*?@(?=[^\s@]*(?:\s|$))")
_AUTHORIZATION = re.compile(
    r"(\bauthorization[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:basic|bearer|digest|token|negotiate|ntlm|apikey)\s+)?+)"
    r"(?!\*\*\*)[^\s\"',;]+", re.IGNORECASE)
_BEARER = re.compile(r"(\bbearer\s+)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_KEY_VALUE = re.compile(
    r"((?<![\w.-])[\w.-]*?(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key"
    r"|secret[_-]?key|private[_-]?key|credentials?|session[_-]?id|cookie)(?![\w-])"
    r"[\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s\"',;&)}\]]+)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_LAST_SPACE = re.compile(r"\s\S*\Z")


def _mask_value(m: re.Match[str]) -> str:
    value = m[2]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return f"{m[1]}{value[0]}{MASK}{value[0]}"
    return f"{m[1]}{MASK}"


def redact(text: str) -> str:
    """``text`` with the credentials described in the module docstring masked."""
    text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
    text = _AUTHORIZATION.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    text = _JWT.sub(MASK, text)
    return _KEY_VALUE.sub(_mask_value, text)


def safe_message(text: object) -> str | None:
    """A message fit for ``error_message``: masked, one line, at most
    :data:`MAX_MESSAGE_CHARS` characters; ``None`` when nothing is left. Anything else
    than a string is first turned into one (:func:`text_of`). Never raises."""
    if type(text) is not str:
        text = text_of(text)
        if text is None:
            return None
    if len(text) > _SCAN_CHARS:
        head = text[:_SCAN_CHARS]
        cut = _LAST_SPACE.search(head)
        text = head[:cut.start()] if cut else f"({len(text)} characters without a space, left out)"
    text = _CONTROL.sub(" ", text)
    text = redact(text).strip()
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS - 1].rstrip() + "…"
    return text or None


def text_of(value: object) -> str | None:
    """``str(value)`` (an exception's message), or ``None`` for ``None``, an empty text or a
    ``__str__`` that raises: never raises itself. Not masked: :func:`safe_message` does that."""
    if value is None:
        return None
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the caller
        return None
    if not isinstance(text, str):
        return None
    return str.__str__(text) or None  # a plain str, even from a str subclass
