"""Each catalogue item's ``ScoredItem`` encoded once, so that an answer is encoded by slicing.

A Rank answer of 200 items built as protobuf messages (200 ``items.add`` calls with their
titles, then the serialization) cost ~0.35 ms of a ~3 ms call on a 2-core machine. But of a
``ScoredItem`` only the score changes from one answer to the next: the item id, the title and
the missing-features flag belong to the snapshot. :class:`AnswerRecords` encodes every
snapshot row's ``ScoredItem`` once (when the snapshot is loaded, off the request path) with a
4-byte hole for the score, and :meth:`AnswerRecords.encode` gathers the chosen rows' bytes
and writes their scores into the holes, in numpy: the bytes of ``RankResponse.items``.

Protobuf's wire format allows this: a message's fields may come in any order and a message's
encoding followed by another's parses as their merge, so ``items`` bytes + the rest of the
``RankResponse`` serialized as usual is one ``RankResponse``
(``tests/server/test_answer_records.py`` parses it back against the message built field by
field).

>>> from avrec.server.protocol import ranking_pb2
>>> records = AnswerRecords.from_items([7, 300], ["Heat", "Léon"], np.array([0, 1], bool))
>>> encoded = records.encode(np.array([1, 0]), np.array([0.75, 0.5]))
>>> answer = ranking_pb2.RankResponse.FromString(encoded)
>>> [(i.item_id, i.score, i.title, i.missing_features) for i in answer.items]
[(300, 0.75, 'Léon', True), (7, 0.5, 'Heat', False)]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ITEMS_TAG = b"\x0a"  # RankResponse.items: field 1, length-delimited
ITEM_ID_TAG = b"\x08"  # ScoredItem.item_id: field 1, varint
SCORE_TAG = b"\x15"  # ScoredItem.score: field 2, 32-bit (float)
TITLE_TAG = b"\x1a"  # ScoredItem.title: field 3, length-delimited
MISSING_FIELD = b"\x20\x01"  # ScoredItem.missing_features = true (field 4, varint 1)
SCORE_BYTES = 4


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int (a negative int64: its 10-byte
    two's complement, as protobuf writes it).

    >>> varint(1).hex(), varint(300).hex(), varint(-1).hex()
    ('01', 'ac02', 'ffffffffffffffffff01')
    """
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def scored_item(item_id: int, title: str, missing: bool) -> tuple[bytes, int]:
    """One ``RankResponse.items`` entry with a zero score, and the offset of the score's 4 bytes.

    >>> scored_item(7, "Heat", False)
    (b'\\n\\r\\x08\\x07\\x15\\x00\\x00\\x00\\x00\\x1a\\x04Heat', 5)
    """
    text = title.encode()
    head = ITEM_ID_TAG + varint(item_id) + SCORE_TAG
    body = (head + bytes(SCORE_BYTES) + TITLE_TAG + varint(len(text)) + text
            + (MISSING_FIELD if missing else b""))
    prefix = ITEMS_TAG + varint(len(body))
    return prefix + body, len(prefix) + len(head)


class AnswerRecords:
    """Every snapshot row's ``ScoredItem`` bytes (score left blank) in one buffer."""

    def __init__(self, item_ids: np.ndarray, titles: Sequence[str], missing: np.ndarray,
                 buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                 score_at: np.ndarray) -> None:
        self.item_ids, self.titles, self.missing = item_ids, titles, missing
        self._buffer, self._starts, self._lengths = buffer, starts, lengths
        self._score_at = score_at  # offset of each record's score within the record

    @classmethod
    def from_items(cls, item_ids: np.ndarray, titles: Sequence[str], missing: np.ndarray
                   ) -> AnswerRecords:
        """Records of rows ``0..n-1``: ``item_ids[i]``, ``titles[i]``, ``missing[i]``."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        missing = np.asarray(missing, dtype=bool)
        if not len(item_ids) == len(titles) == len(missing):
            raise ValueError("item_ids, titles and missing must be aligned")
        encoded = [scored_item(i, t, m) for i, t, m in
                   zip(item_ids.tolist(), titles, missing.tolist(), strict=True)]
        lengths = np.asarray([len(record) for record, _ in encoded], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        buffer = np.frombuffer(b"".join(record for record, _ in encoded), dtype=np.uint8)
        score_at = np.asarray([at for _, at in encoded], dtype=np.int64)
        return cls(item_ids, titles, missing, buffer, starts, lengths, score_at)

    def __len__(self) -> int:
        return int(self.item_ids.size)

    def encode(self, rows: np.ndarray, scores: np.ndarray) -> bytes:
        """The ``RankResponse.items`` bytes of ``rows`` in order, with ``scores`` (as the
        float32 protobuf stores them)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return b""
        lengths = self._lengths[rows]
        ends = np.cumsum(lengths)
        out_starts = ends - lengths
        # byte j of the answer is byte j - out_start + start of its record in the buffer
        shift = np.repeat(self._starts[rows] - out_starts, lengths)
        out = self._buffer[np.arange(int(ends[-1])) + shift]
        holes = (out_starts + self._score_at[rows])[:, None] + np.arange(SCORE_BYTES)
        out[holes] = np.asarray(scores, dtype="<f4").view(np.uint8).reshape(-1, SCORE_BYTES)
        return out.tobytes()

