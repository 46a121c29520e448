from __future__ import annotations

import json

import pytest

from tests.schemas.test_events import product_payload
from worker.errors import InvalidEvent
from worker.intake import parse_event, parse_intake_event


def test_parses_a_valid_event() -> None:
    body = json.dumps(product_payload()).encode()

    event = parse_event(body)

    assert event.title == "502 slim taper flex"


def test_invalid_json_names_the_body_and_the_value() -> None:
    body = b'{"event_id": "oops'

    with pytest.raises(InvalidEvent) as caught:
        parse_event(body)

    assert caught.value.field == "body"
    assert "oops" in caught.value.value
    assert "dead-lettered" in str(caught.value)


def test_a_schema_break_names_the_field_value_and_what_is_allowed() -> None:
    body = json.dumps(product_payload(product_id="../../secrets")).encode()

    with pytest.raises(InvalidEvent) as caught:
        parse_event(body)

    assert caught.value.field == "product_id"
    assert "../../secrets" in caught.value.value
    assert "pattern" in caught.value.allowed


def test_long_values_are_cut_short_in_the_message() -> None:
    body = json.dumps(product_payload(title="x" * 5000)).encode()

    with pytest.raises(InvalidEvent) as caught:
        parse_event(body)

    assert caught.value.field == "title"
    assert len(str(caught.value)) < 400


def test_a_json_array_is_not_an_event() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(b"[1, 2]")

    assert caught.value.allowed == "a JSON object"


def test_a_missing_field_is_named_as_missing_not_shown_as_the_whole_event() -> None:
    payload = product_payload()
    del payload["title"]

    with pytest.raises(InvalidEvent) as caught:
        parse_event(json.dumps(payload).encode())

    assert caught.value.field == "title"
    assert "missing" in caught.value.value


def test_an_unknown_event_type_names_the_types_the_intake_takes() -> None:
    body = json.dumps(product_payload(event_type="product.updated")).encode()

    with pytest.raises(InvalidEvent) as caught:
        parse_intake_event(body)

    assert caught.value.field == "event_type"
    assert "product.updated" in caught.value.value
    assert caught.value.allowed == "product.created or product.deleted"


def test_an_invalid_event_keeps_the_event_and_product_ids_it_carried() -> None:
    payload = product_payload(images=[])

    with pytest.raises(InvalidEvent) as caught:
        parse_intake_event(json.dumps(payload).encode())

    assert caught.value.event_id == payload["event_id"]
    assert caught.value.product_id == payload["product_id"]


def test_ids_that_are_not_text_are_left_out_of_an_invalid_event() -> None:
    payload = product_payload(event_type="product.updated", product_id={"nested": 1})

    with pytest.raises(InvalidEvent) as caught:
        parse_intake_event(json.dumps(payload).encode())

    assert caught.value.event_id == payload["event_id"]
    assert caught.value.product_id is None
