"""Property-based: whatever arrives on the intake queue, parsing ends in an event or in
InvalidEvent, never in another exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import ProductCreated
from tests.schemas.test_events import product_payload
from worker.errors import InvalidEvent
from worker.intake import parse_event

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def outcome(body: bytes) -> str:
    try:
        return type(parse_event(body)).__name__
    except InvalidEvent as exc:
        assert exc.field and exc.allowed
        return "InvalidEvent"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_are_rejected_cleanly(body: bytes) -> None:
    assert outcome(body) in {"ProductCreated", "InvalidEvent"}


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_values_parse_or_are_rejected_cleanly(value: Any) -> None:
    assert outcome(json.dumps(value).encode()) in {"ProductCreated", "InvalidEvent"}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(product_payload())), json_values)
def test_a_valid_event_with_one_field_replaced_parses_or_is_rejected_cleanly(
    field: str, value: Any
) -> None:
    body = json.dumps(product_payload(**{field: value})).encode()

    result = outcome(body)

    assert result in {"ProductCreated", "InvalidEvent"}
    if result == "ProductCreated":
        assert isinstance(parse_event(body), ProductCreated)
