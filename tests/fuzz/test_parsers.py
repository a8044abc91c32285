"""Property tests on every parser that reads client input: whatever the text, each either parses
or refuses with a problem (a 4xx with a code); nothing else escapes. Pure: no services."""

from __future__ import annotations

import json
from urllib.parse import quote_from_bytes

import pytest
from flask import Flask
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from werkzeug.datastructures import MultiDict

from api.batches import _parse_csv, _parse_jsonl, _validate_items
from api.pagination import decode_cursor, parse_limit
from api.parsing import decode_base64_image, form_fields, json_body, loads, unstorable_path
from api.problems import ApiProblem
from api.schemas import FIELD_CODES, BatchCreate, JobParams, validation_problem

pytestmark = pytest.mark.unit

# Every code point, surrogates and NUL included (hypothesis leaves surrogates out by default).
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4), max_leaves=12)


def _problem_or_value(call, *args):
    try:
        return call(*args)
    except ApiProblem as problem:
        assert 400 <= problem.status < 500 and problem.code
        return problem


@given(ANY_TEXT)
def test_csv(text):
    _problem_or_value(_parse_csv, text)


@given(st.lists(JSONISH | ANY_TEXT, max_size=5).map(lambda xs: "\n".join(
    json.dumps(x) if not isinstance(x, str) else x for x in xs)))
def test_jsonl(text):
    _problem_or_value(_parse_jsonl, text)


@given(st.one_of(ANY_TEXT, st.builds(lambda t, p: f"data:{t};base64,{p}", ANY_TEXT, ANY_TEXT)))
def test_base64_and_data_uris(text):
    _problem_or_value(decode_base64_image, text)


@given(st.lists(st.tuples(st.sampled_from(["prompts", "metadata", "threshold", "webhook_events", "x"]) | ANY_TEXT,
                          ANY_TEXT | JSONISH.map(json.dumps)), max_size=6))
def test_multipart_fields(pairs):
    _problem_or_value(form_fields, MultiDict(pairs), FIELD_CODES)


@given(st.binary(max_size=200) | JSONISH.map(lambda v: json.dumps(v).encode()))
def test_json_bodies(raw):
    with Flask(__name__).test_request_context("/", method="POST", data=raw, content_type="application/json"):
        _problem_or_value(json_body, FIELD_CODES)


@given(JSONISH)
def test_unstorable_text_is_found_exactly_when_utf8_postgres_would_refuse_it(value):
    dumped = json.dumps(value, ensure_ascii=False)
    try:
        storable = "\x00" not in dumped and "\\u0000" not in dumped and bool(dumped.encode("utf-8"))
    except UnicodeEncodeError:
        storable = False
    assert (unstorable_path(value) is None) == storable


@given(ANY_TEXT | st.binary(max_size=80).map(lambda b: b.hex()))
def test_cursors(cursor):
    with Flask(__name__).test_request_context("/"):
        _problem_or_value(decode_cursor, cursor)


@given(ANY_TEXT)
def test_limits(raw):
    # a query string is bytes on the wire: encode what the client could have sent
    query = "limit=" + quote_from_bytes(raw.encode("utf-8", "surrogatepass"))
    with Flask(__name__).test_request_context("/", query_string=query):
        value = _problem_or_value(parse_limit)
        assert isinstance(value, ApiProblem) or 1 <= value <= 100


@given(st.dictionaries(st.sampled_from(["prompts", "threshold", "metadata", "webhook_url", "webhook_events", "y"]),
                       JSONISH, max_size=5))
def test_job_fields(fields):
    try:
        JobParams.model_validate(fields)
    except ValidationError as exc:
        problem = validation_problem(exc)
        assert problem.status == 422 and problem.code


@given(st.lists(JSONISH, max_size=4), JSONISH)
def test_batch_items(items, defaults):
    try:
        fields = BatchCreate.model_validate(defaults if isinstance(defaults, dict) else {})
    except ValidationError:
        return
    _problem_or_value(_validate_items, fields, items, 10)


@given(st.text(st.sampled_from("0123456789-+.eE"), min_size=1, max_size=6000))
def test_long_numbers_parse_or_are_malformed(digits):
    try:
        loads(digits)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError: a 400 malformed_json in json_body
        assert isinstance(exc, json.JSONDecodeError), exc


URL_ALPHABET = st.sampled_from(list("abcXYZ019.-_~!$&'()*+,;=:@%/?#[] \t\\\x00é") + ["http://", "https://", ":99999",
                                                                                   ":80", "//", "[::1]"])


@given(st.lists(URL_ALPHABET, max_size=14).map("".join), st.sampled_from(["http://", "https://", "ftp://", ""]))
def test_the_plain_url_fast_path_never_accepts_what_the_full_check_refuses(tail, scheme):
    """check_url_syntax answers plain URLs without urllib3's parser; whatever it accepts that way,
    the full check (urlsplit, the port, urllib3's parse_url) accepts too."""
    from shared.fetch import _PLAIN_URL, _url_problem, check_url_syntax

    url = scheme + tail
    assert (check_url_syntax(url) is None) == (_url_problem(url) is None), url
    if _PLAIN_URL.fullmatch(url) is not None:
        assert _url_problem(url) is None or int(url.rsplit(":", 1)[1].split("/")[0].split("?")[0]) > 65535, url
