"""Answers encoded from the snapshot's records parse as the messages built field by field."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from avrec.server.answer_records import AnswerRecords, varint
from avrec.server.answers import Ranked
from avrec.server.feature_reader import OnlineRow
from avrec.server.protocol import ranking_pb2
from avrec.server.service import encode_response, timestamp, to_proto

catalogues = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 2**62), min_size=n, max_size=n, unique=True),
    st.lists(st.text(max_size=200), min_size=n, max_size=n),  # > 127 bytes: 2-byte lengths
    st.lists(st.booleans(), min_size=n, max_size=n),
))
# float32 values (what the field holds; scores are probabilities), zeros and the smallest
scores = st.floats(allow_nan=False, width=32) | st.sampled_from([0.0, -0.0, 1e-45, 1.0])


def by_fields(ids: list[int], titles: list[str], missing: list[bool], rows: list[int],
              values: list[float]) -> ranking_pb2.RankResponse:
    """The oracle: the items added one by one, as protobuf builds them."""
    response = ranking_pb2.RankResponse()
    for row, value in zip(rows, values, strict=True):
        response.items.add(item_id=ids[row], score=value, title=titles[row],
                           missing_features=missing[row])
    return response


@settings(max_examples=200, deadline=None)
@given(catalogues, st.data())
def test_encoded_items_parse_as_the_items_built_field_by_field(catalogue, data) -> None:
    ids, titles, missing = catalogue
    records = AnswerRecords.from_items(np.array(ids), titles, np.array(missing))
    rows = data.draw(st.permutations(range(len(ids))).map(
        lambda order: order[:data.draw(st.integers(0, len(ids)))]))
    values = data.draw(st.lists(scores, min_size=len(rows), max_size=len(rows)))
    encoded = records.encode(np.array(rows, dtype=np.int64), np.array(values))
    expected = by_fields(ids, titles, missing, rows, values)
    assert ranking_pb2.RankResponse.FromString(encoded) == expected


def test_varint_matches_protobuf() -> None:
    for value in (1, 127, 128, 300, 2**31, 2**63 - 1):
        message = ranking_pb2.ScoredItem(item_id=value)
        assert message.SerializeToString() == b"\x08" + varint(value)


def answer(explanations: list | None) -> Ranked:
    records = AnswerRecords.from_items(np.array([10, 20, 30]), ["Alien", "", "Amélie"],
                                       np.array([False, True, True]))
    row = OnlineRow(7, datetime(2018, 9, 1, tzinfo=UTC), True, False, {})
    return Ranked(np.array([2, 0, 1]), np.array([0.9, 0.5, 0.0]), records, False, row,
                  datetime(2018, 9, 25, tzinfo=UTC), "v1",
                  {"item_behaviour": datetime(2018, 9, 24, tzinfo=UTC)}, "model-1",
                  explanations)


def test_encoded_response_equals_the_message_built_field_by_field() -> None:
    plain = answer(None)
    encoded = ranking_pb2.RankResponse.FromString(encode_response(plain))
    assert encoded == to_proto(plain)
    assert [i.item_id for i in encoded.items] == [30, 10, 20]
    assert encoded.items_missing_features == 2
    assert encoded.model_version == "model-1" and encoded.user_features[1].feature_view


def test_an_explained_answer_keeps_its_explanations() -> None:
    explained = answer([(5, 0.8, "Heat"), None, (6, 0.1, "Ran")])
    encoded = ranking_pb2.RankResponse.FromString(encode_response(explained))
    assert encoded == to_proto(explained)
    assert encoded.items[0].explanation.history_title == "Heat"
    assert not encoded.items[1].HasField("explanation")


@given(st.datetimes(timezones=st.timezones()))
def test_timestamp_is_protobufs_from_datetime(when: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(when.astimezone(UTC))
    assert timestamp(when) == expected
