"""The request-target parser against its redactor, and its users against each other.

A redactor that splits a target differently from the code that reads tokens out of it
writes tokens to logs; these tests hold the two to one reading of every target.
"""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.http11 import Request

from trio_bridge.config import Address
from trio_bridge.request_target import redact, split_target
from trio_bridge.routing import HttpRefusal
from trio_bridge.tokens.router import EXTRACTORS, TokenRouter, extract_token
from trio_bridge.web import HealthEndpoint

#: Stands for a secret: no part of a generated target but a secret holds it.
MARK = "\ue000"
#: Any text a request line can carry: control characters, non-ASCII, and the lone
#: surrogates websockets decodes undecodable bytes to.
ANY = st.text(st.characters(exclude_categories=()))
DELIMITERS = "#?&=/%+"


def text_without(forbidden: str) -> st.SearchStrategy[str]:
    """Text (often full of delimiters) free of ``forbidden`` and of MARK, even decoded."""
    chars = st.one_of(st.sampled_from(DELIMITERS), st.characters(exclude_categories=()))
    text = st.text(chars.filter(lambda c: c not in forbidden + MARK))
    return text.filter(lambda t: MARK not in urllib.parse.unquote_plus(t))


def secret(forbidden: str) -> st.SearchStrategy[str]:
    """MARK plus any text, as it is or percent-encoded as a client would send it."""
    raw = st.builds(lambda tail: MARK + tail, text_without(forbidden))
    encoded = raw.map(lambda s: urllib.parse.quote(s, safe="", errors="surrogatepass"))
    return st.one_of(raw, encoded)


def names(query: str) -> list[str]:
    """Field names as the token router's parser (``urllib.parse``) reads them."""
    return [name for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]


def last_segment(path: str) -> int | None:
    return max((i for i, s in enumerate(path.split("/")) if s), default=None)


@given(target=ANY, path_token=st.booleans())
def test_the_redacted_target_reads_as_the_target_without_its_values(
    target: str, path_token: bool
) -> None:
    path, query = split_target(target)
    redacted_path, redacted_query = split_target(redact(target, path_token=path_token))
    segments, redacted_segments = path.split("/"), redacted_path.split("/")
    if path_token and (last := last_segment(path)) is not None:
        segments[last] = "..."
    assert redacted_segments == segments
    assert names(redacted_query) == names(query)
    assert {v for _, v in urllib.parse.parse_qsl(redacted_query)} <= {"..."}
    redacted = redact(target, path_token=path_token)
    assert redact(redacted, path_token=path_token) == redacted  # nothing left to hide


@given(
    segments=st.lists(text_without("/?#"), max_size=4),
    token=secret("/?#"),
    fields=st.lists(st.tuples(text_without("&=#"), secret("&#")), max_size=4),
    fragment=st.one_of(st.just(""), st.builds(lambda t: "#" + t, ANY)),
)
def test_no_secret_the_parser_reads_reaches_the_redacted_target(
    segments: list[str], token: str, fields: list[tuple[str, str]], fragment: str
) -> None:
    query = "&".join(f"{name}={value}" for name, value in fields)
    target = "/".join(["", *segments, token]) + (f"?{query}" if query else "") + fragment
    # The secrets are where the token router reads them...
    assert EXTRACTORS["path"](Request(target, Headers())) == urllib.parse.unquote(token)
    values = [value for _, value in urllib.parse.parse_qsl(split_target(target)[1])]
    assert values == [urllib.parse.unquote_plus(value) for _, value in fields]
    # ...and none of them, as sent or decoded, is in what logs and recordings get.
    redacted = redact(target, path_token=True)
    assert MARK not in redacted
    assert MARK not in urllib.parse.unquote_plus(redacted)


@pytest.mark.parametrize(
    ("target", "path", "query", "redacted", "with_path_token"),
    [
        ("/a#x?token=1", "/a", "", "/a", "/..."),
        ("/a?token=1#x&b=2", "/a", "token=1", "/a?token=...", "/...?token=..."),
        (
            "/vnc/T%2Fok?token=x&a=b",
            "/vnc/T%2Fok",
            "token=x&a=b",
            "/vnc/T%2Fok?token=...&a=...",
            "/vnc/...?token=...&a=...",
        ),
        (
            "/vnc/Tok/?a&&b==c",
            "/vnc/Tok/",
            "a&&b==c",
            "/vnc/Tok/?a=...&b=...",
            "/vnc/.../?a=...&b=...",
        ),
        ("//host[/x?y=1", "//host[/x", "y=1", "//host[/x?y=...", "//host[/...?y=..."),
        ("/a?", "/a", "", "/a", "/..."),
        ("/", "/", "", "/", "/"),
        ("", "", "", "", ""),
    ],
)
def test_explicit_targets(
    target: str, path: str, query: str, redacted: str, with_path_token: str
) -> None:
    assert split_target(target) == (path, query)
    assert redact(target) == redacted
    assert redact(target, path_token=True) == with_path_token


async def test_every_user_reads_a_fragment_alike() -> None:
    class Nothing:
        async def lookup(self, token: str) -> Address | None:
            return None

    request = Request("/healthz#x?token=1", Headers())
    with pytest.raises(HttpRefusal, match="No token"):
        extract_token(request, "query")
    assert extract_token(request, "path") == "healthz"
    assert TokenRouter(Nothing()).redact_path(request.path) == "/healthz"
    response = await HealthEndpoint().respond(request, "client")
    assert response is not None and response.status_code == 200
