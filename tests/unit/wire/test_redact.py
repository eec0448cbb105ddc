"""Error messages before they are kept: each masking rule, the bounds, and text left alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire.redact import MAX_MESSAGE_CHARS, redact, safe_message, text_of


@pytest.mark.parametrize(("text", "want"), [
    # passwords in URLs
    ("connect to postgresql://u:secret@h/db failed",
     "connect to postgresql://u:***@h/db failed"),
    ("redis://:s3cr3t@cache:6379/0 refused", "redis://:***@cache:6379/0 refused"),
    ("'amqp://guest:p@ss@rabbit:5672/' down", "'amqp://guest:***@rabbit:5672/' down"),
    ("a://u:p@h,b://v:q@k", "a://u:***@k"),
    # bearer tokens and Authorization headers
    ("401 for Bearer abc.def", "401 for Bearer ***"),
    ("header bearer eyJhbGciOi.x-y_z+/== rejected", "header bearer *** rejected"),
    ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
    ("Authorization: Bearer abc.def", "Authorization: Bearer ***"),
    ('{"authorization": "tok123"}', '{"authorization": "***"}'),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-nature_1 expired", "jwt *** expired"),
    # key=value and key: value pairs
    ("password=hunter2 host=db", "password=*** host=db"),
    ("host=db user=app password='with space' port=5432",
     "host=db user=app password='***' port=5432"),
    ("GET /v1/items?token=abc123&page=2", "GET /v1/items?token=***&page=2"),
    ("api_key=AKIA1234; apikey: zzz, X-Api-Key: k-9", "api_key=***; apikey: ***, X-Api-Key: ***"),
    ('{"db_password": "pw", "user": "app"}', '{"db_password": "***", "user": "app"}'),
    ("access_token=a.b.c client_secret=xyz", "access_token=*** client_secret=***"),
    ("PASSWORD = topsecret", "PASSWORD = ***"),
    ("Cookie: session=abc; theme=dark", "Cookie: ***; theme=dark"),
])
def test_masks_credentials(text: str, want: str) -> None:
    assert redact(text) == want
    assert safe_message(text) == want
    assert redact(want) == want  # idempotent: the worker redacts what the shim redacted


@pytest.mark.parametrize("text", [
    "connection refused by payments:8080 after 3 attempts (timeout=5s)",
    "HTTP 503 from https://payments.internal:8443/v1/charge?order=42",
    "password authentication failed for user \"app\"",
    "max_tokens=100 tokens=5 passwords_expired=3",
    "mail bob@example.com or see http://docs.example.com:80/x",
    "KeyError: 'order_id'",
    "Ünïcödé → ok; 50% done [retrying]",
])
def test_leaves_other_text_alone(text: str) -> None:
    assert redact(text) == text
    assert safe_message(text) == text


def test_control_characters_become_one_space_and_ends_are_stripped() -> None:
    assert safe_message("  line one\nline two\r\n\tdetail\x1b[31m red\x9b \x00end\n") == (
        "line one line two detail [31m red   end")


def test_length_is_bounded_after_masking() -> None:
    long = "x" * 5000
    got = safe_message(long)
    assert got is not None and len(got) == MAX_MESSAGE_CHARS
    assert got == "x" * (MAX_MESSAGE_CHARS - 1) + "…"
    exact = "y" * MAX_MESSAGE_CHARS
    assert safe_message(exact) == exact
    # the secret sits right at the cut: masked before cutting, so no part of it is kept
    text = "a" * (MAX_MESSAGE_CHARS - 10) + " password=supersecretvalue"
    assert safe_message(text) == "a" * (MAX_MESSAGE_CHARS - 10) + " password…"


def test_huge_input_is_cut_at_whitespace_before_masking() -> None:
    # a URL password beyond the scan limit is dropped with its whole token, never half-seen
    text = "e " * 20_000 + "postgresql://u:secret@h/db"
    got = safe_message(text)
    assert got is not None and "secret" not in got and len(got) == MAX_MESSAGE_CHARS
    assert safe_message("z" * 100_000) == "(100000 characters without a space, left out)"


def test_empty_and_none() -> None:
    assert safe_message(None) is None
    assert safe_message("") is None
    assert safe_message(" \n\t ") is None


def test_exceptions_and_other_objects() -> None:
    assert safe_message(ConnectionError("to postgresql://u:secret@h/db")) == (
        "to postgresql://u:***@h/db")
    assert safe_message(ValueError()) is None
    assert safe_message(503) == "503"
    assert text_of(ValueError("password=x")) == "password=x"  # masking is safe_message's
    assert text_of(None) is None and text_of(KeyError()) is None

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert safe_message(Broken()) is None and text_of(Broken()) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_comes_out_bounded_clean_and_stable(text: str) -> None:
    got = safe_message(text)
    if got is None:
        return
    assert 1 <= len(got) <= MAX_MESSAGE_CHARS
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in got)
    assert safe_message(got) == got
