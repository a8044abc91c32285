"""What reaches the submission service is validated here, without services (`make test-unit`):
job fields, batch items merged over batch defaults, multipart fields, base64, CSV and paging."""

from __future__ import annotations

import pytest
from flask import Flask
from pydantic import ValidationError
from werkzeug.datastructures import MultiDict

from api.batches import _parse_csv, _validate_items
from api.pagination import parse_limit
from api.parsing import decode_base64_image, form_fields
from api.problems import ApiProblem
from api.schemas import FIELD_CODES, BatchCreate, JobParams, validation_problem
from shared.enums import JobEvent

pytestmark = pytest.mark.unit


def _problem(fields: dict) -> ApiProblem:
    with pytest.raises(ValidationError) as info:
        JobParams.model_validate(fields)
    return validation_problem(info.value)


def test_job_fields_are_cleaned_and_defaulted():
    params = JobParams.model_validate({"prompts": [" shirt ", "pants"],
                                       "webhook_events": ["job.failed", "job.succeeded", "job.failed"]})
    assert params.prompts == ["shirt", "pants"] and params.threshold == 0.4 and params.metadata == {}
    assert params.webhook_events == [JobEvent.SUCCEEDED, JobEvent.FAILED]  # contract order, once each


@pytest.mark.parametrize(("fields", "code", "field"), [
    ({"prompts": ["   "]}, "invalid_prompts", "prompts"),
    ({"prompts": ["x" * 201]}, "invalid_prompts", "prompts"),
    ({"prompts": ["a"] * 17}, "invalid_prompts", "prompts"),
    ({"prompts": ["a"], "threshold": 0}, "invalid_threshold", "threshold"),
    ({"prompts": ["a"], "threshold": 1}, "invalid_threshold", "threshold"),
    ({"prompts": ["a"], "metadata": {str(i): "v" for i in range(17)}}, "invalid_metadata", "metadata"),
    ({"prompts": ["a"], "metadata": {"k": 1}}, "invalid_metadata", "metadata"),
    ({"prompts": ["a"], "webhook_events": ["batch.completed"]}, "invalid_webhook_events", "webhook_events[0]"),
    ({"prompts": ["a"], "webhook_url": "file:///etc/passwd"}, "invalid_webhook_url", "webhook_url"),
    ({"prompts": ["a"], "colour": "red"}, "unknown_field", "colour"),
])
def test_each_bad_job_field_gets_its_code(fields, code, field):
    # (no prompts and no preset is refused once the preset is resolved: tests/api/test_presets.py)
    problem = _problem(fields)
    assert (problem.status, problem.code) == (422, code)
    assert problem.errors[0]["field"] == field


def test_batch_items_merge_over_the_batch_defaults():
    fields = BatchCreate.model_validate({"prompts": ["shirt"], "threshold": 0.3, "metadata": {"catalog": "s"},
                                         "webhook_url": "https://hooks.test/x", "webhook_events": ["job.failed"]})
    spec = _validate_items(fields, [{"image_url": "https://cdn.test/1.jpg"},
                                    {"image_url": "https://cdn.test/2.jpg", "prompts": ["dress"], "threshold": 0.6,
                                     "metadata": {"sku": "2"}}], limit=10)
    first, second = spec.items
    assert (first.prompts, first.threshold, first.metadata) == (["shirt"], 0.3, {"catalog": "s"})
    assert (second.prompts, second.threshold, second.metadata) == (["dress"], 0.6, {"catalog": "s", "sku": "2"})
    assert first.input == {"image_url": "https://cdn.test/1.jpg"} and first.webhook_events == ["job.failed"]
    assert spec.webhook_url is None  # only job events were asked for: the batch sends no batch.completed


@pytest.mark.parametrize(("items", "field"), [
    ([{"image_url": "https://a.test/1.jpg"}, {"image_url": "ftp://a.test/2.jpg"}], "items[1].image_url"),
    ([{"image_url": "https://a.test/1.jpg", "prompts": ["  "]}], "items[0].prompts"),
    ([{"image_url": "https://a.test/1.jpg", "size": 3}], "items[0].size"),
    (["https://a.test/1.jpg"], "items[0]"),
])
def test_the_first_bad_item_fails_the_batch_naming_its_index(items, field):
    with pytest.raises(ApiProblem) as info:
        _validate_items(BatchCreate.model_validate({"prompts": ["a"]}), items, limit=10)
    assert info.value.code == "invalid_batch_item" and info.value.errors[0]["field"] == field


def test_batch_size_limits():
    fields = BatchCreate.model_validate({"prompts": ["a"]})
    for items in ([], [{"image_url": "https://a.test/x.jpg"}] * 3):
        with pytest.raises(ApiProblem) as info:
            _validate_items(fields, items, limit=2)
        assert info.value.code == "invalid_items"


def test_csv_columns_become_items():
    items = _parse_csv("image_url,prompts,sku\nhttps://a.test/1.jpg,shirt|pants,A1\nhttps://a.test/2.jpg,,\n")
    assert items == [{"image_url": "https://a.test/1.jpg", "prompts": ["shirt", "pants"], "metadata": {"sku": "A1"}},
                     {"image_url": "https://a.test/2.jpg"}]


def test_carriage_returns_and_oversized_csv_fields_are_no_500():
    # found by the fuzzer: a bare carriage return in an unquoted field made csv raise (a 500)
    assert _parse_csv("image_url,sku\nhttps://a.test/1.jpg,a\rhttps://a.test/2.jpg,b\n") == [
        {"image_url": "https://a.test/1.jpg", "metadata": {"sku": "a"}},
        {"image_url": "https://a.test/2.jpg", "metadata": {"sku": "b"}}]
    assert _parse_csv('image_url,note\r\nhttps://a.test/1.jpg,"two\r\nlines"\r\n')[0]["metadata"] == {
        "note": "two\r\nlines"}
    with pytest.raises(ApiProblem) as info:  # csv's own limit on a field (131,072 characters)
        _parse_csv("image_url,sku\nhttps://a.test/1.jpg," + "x" * 200_000 + "\n")
    assert info.value.code == "invalid_items" and "line 2" in info.value.detail


def test_multipart_fields_repeat_lists_and_parse_metadata_json():
    form = MultiDict([("prompts", "shirt"), ("prompts", "pants"), ("metadata", '{"sku": "1"}'), ("threshold", "0.3")])
    assert form_fields(form, FIELD_CODES) == {"prompts": ["shirt", "pants"], "metadata": {"sku": "1"},
                                              "threshold": "0.3"}
    with pytest.raises(ApiProblem) as info:
        form_fields(MultiDict([("metadata", "{not json")]), FIELD_CODES)
    assert info.value.code == "invalid_metadata"


def test_base64_and_data_uris():
    assert decode_base64_image("data:image/png;base64,aGVsbG8=") == b"hello"
    assert decode_base64_image("aGVs\nbG8=") == b"hello"
    with pytest.raises(ApiProblem) as info:
        decode_base64_image("not base64 at all!")
    assert info.value.code == "invalid_image_base64"


@pytest.mark.parametrize(("raw", "ok"), [("1", True), ("100", True), ("0", False), ("101", False), ("²", False),
                                         ("٣", False), ("1e2", False), ("-1", False), ("", False)])
def test_limit_takes_ascii_digits_from_1_to_100(raw, ok):
    with Flask(__name__).test_request_context("/", query_string={"limit": raw}):
        if ok:
            assert parse_limit() == int(raw)
        else:
            with pytest.raises(ApiProblem) as info:
                parse_limit()
            assert info.value.code == "invalid_limit"
