"""Hypothesis strategies for fuzzing the ranking service and ingest, shared by the tests
(a small sample) and the bench scripts (``bench/fuzz_rpc.py``: thousands of calls).

RPC cases are ``(rpc, request)`` pairs: ``request`` is a protobuf message, or raw bytes sent
to the method as they are (garbage payloads). Values reach for the edges: int64/int32 extremes,
NaN and infinities, odd unicode, unset fields, candidate lists past ``max_candidates`` and
messages past the 4 MiB limit, timestamps outside protobuf's range.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st

from avrec.server.protocol import SERVICE_NAME, ranking_pb2

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
EDGES = [0, 1, -1, INT64[0], INT64[1], INT32[0], INT32[1], 2**32, 2**53 + 1]
HEALTH = "/grpc.health.v1.Health/Check"
METHODS = {
    "Rank": (f"/{SERVICE_NAME}/Rank", ranking_pb2.RankResponse.FromString),
    "Recommend": (f"/{SERVICE_NAME}/Recommend", ranking_pb2.RankResponse.FromString),
    "LogEvents": (f"/{SERVICE_NAME}/LogEvents", ranking_pb2.LogEventsResponse.FromString),
    "Health": (HEALTH, health_pb2.HealthCheckResponse.FromString),
}
RPCS = (*METHODS, "garbage")
# what each RPC may answer: the service's documented codes (never INTERNAL or UNKNOWN)
ALLOWED = {
    "Rank": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "Recommend": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "LogEvents": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "Health": {"OK", "NOT_FOUND"},
    "garbage": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"},
}
ODD_TEXT = ["", "rating", "tag", "RATING", "rating\x00", "ratıng", "r\u0301ating", "\u202erating",
            "評価", "\U0001f3ac", "tag " * 1000, "\ufeffrating", "\x7f"]


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EDGES), st.integers(*INT64))


def ids(known: Sequence[int]) -> st.SearchStrategy[int]:
    """Mostly real ids, sometimes edges and random int64s."""
    return st.one_of(st.sampled_from(list(known)), st.sampled_from(list(known)), int64s())


def int32s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 5, 10, 200, -1, *INT32]), st.integers(*INT32))


def float32s() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, 0.5, 1.0, 5.0, -0.0, float("nan"), float("inf"),
                                      -float("inf"), 1e-45, 3.4e38]),
                     st.floats(width=32))


def texts() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=64))


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """The value, or None for a field left unset."""
    return st.one_of(st.none(), strategy)


def fields(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None}


def options() -> st.SearchStrategy:
    return maybe(st.builds(
        lambda explain, lam: ranking_pb2.RankOptions(
            **fields(explain=explain, diversity_lambda=lam)),
        maybe(st.booleans()), maybe(float32s())))


def candidate_lists(items: Sequence[int]) -> st.SearchStrategy[list[int]]:
    """Short mixed lists, real samples up to past ``max_candidates`` (duplicates included),
    and (1 in 10) huge lists: 300,000 small ids (past the limit) or 500,000 9-byte ids (past
    the 4 MiB message limit)."""
    pool = list(items)
    sampled = st.tuples(st.integers(0, min(1300, len(pool))), st.randoms(use_true_random=False),
                        st.booleans()).map(
        lambda t: t[1].sample(pool, t[0]) + (pool[: t[0] // 10] if t[2] else []))
    huge = st.sampled_from([300_000, 500_000]).map(
        lambda n: list(range(1, n + 1)) if n < 400_000 else list(range(2**62, 2**62 + n)))
    short = st.lists(ids(items), max_size=20)
    return st.one_of(short, sampled, short, sampled, short, short, sampled, short, short, huge)


def valid_options() -> st.SearchStrategy:
    return maybe(st.builds(ranking_pb2.RankOptions, explain=st.booleans(),
                           diversity_lambda=st.floats(0, 1, width=32)))


def rank_requests(users: Sequence[int], items: Sequence[int]) -> st.SearchStrategy:
    """Half plausible requests (known user, 1-300 distinct known items), half wild ones."""
    plausible = st.builds(
        lambda user, n, rnd, top_k, opts: ranking_pb2.RankRequest(
            user_id=user, candidate_item_ids=rnd.sample(list(items), min(n, len(items))),
            top_k=top_k, options=opts),
        st.sampled_from(list(users)), st.integers(1, 300), st.randoms(use_true_random=False),
        st.integers(0, 50), valid_options())
    wild = st.builds(
        lambda user, candidates, top_k, opts: ranking_pb2.RankRequest(**fields(
            user_id=user, candidate_item_ids=candidates, top_k=top_k, options=opts)),
        maybe(ids(users)), maybe(candidate_lists(items)), maybe(int32s()), options())
    return st.one_of(plausible, wild)


def recommend_requests(users: Sequence[int]) -> st.SearchStrategy:
    plausible = st.builds(ranking_pb2.RecommendRequest, user_id=st.sampled_from(list(users)),
                          top_k=st.integers(1, 100), options=valid_options())
    wild = st.builds(
        lambda user, top_k, opts: ranking_pb2.RecommendRequest(**fields(
            user_id=user, top_k=top_k, options=opts)),
        maybe(ids(users)), maybe(int32s()), options())
    return st.one_of(plausible, wild)


def timestamps() -> st.SearchStrategy:
    """In range, before 1970, after the clock, and outside protobuf's range (seconds, nanos)."""
    seconds = st.one_of(st.sampled_from([0, 1_500_000_000, -62_135_596_800, 253_402_300_799,
                                         253_402_300_800, -62_135_596_801]), int64s(),
                        st.integers(820_000_000, 1_537_000_000))
    nanos = st.one_of(st.sampled_from([0, 999_999_999, 1_000_000_000, -1]), st.integers(*INT32))
    return st.builds(lambda s, n: Timestamp(**fields(seconds=s, nanos=n)),
                     maybe(seconds), maybe(nanos))


def log_requests(users: Sequence[int], items: Sequence[int]) -> st.SearchStrategy:
    """Batches of events; ``users`` should be ids the caller does not mind being updated."""
    event = st.builds(
        lambda user, item, kind, rating, stamp: ranking_pb2.Event(**fields(
            user_id=user, item_id=item, event_type=kind, rating=rating, event_timestamp=stamp)),
        maybe(ids(users)), maybe(ids(items)),
        maybe(st.one_of(st.sampled_from(["rating", "tag"]), texts())),
        maybe(float32s()), maybe(timestamps()))
    valid = st.builds(
        lambda user, item, rating, stamp: ranking_pb2.Event(**fields(
            user_id=user, item_id=item, event_type="rating" if rating else "tag",
            rating=rating, event_timestamp=stamp)),
        st.sampled_from(list(users)), st.sampled_from(list(items)),
        st.sampled_from([None, 0.5, 1.0, 3.5, 5.0]),
        maybe(st.integers(820_000_000, 1_537_000_000).map(lambda t: Timestamp(seconds=t))))
    many = st.builds(lambda e, n: [e] * n, event, st.sampled_from([1201, 5000]))
    return st.builds(lambda events: ranking_pb2.LogEventsRequest(events=events),
                     st.one_of(st.lists(valid, min_size=1, max_size=4),
                               st.lists(event, max_size=8), many))


def health_requests() -> st.SearchStrategy:
    return st.builds(lambda name: health_pb2.HealthCheckRequest(**fields(service=name)),
                     maybe(st.one_of(st.sampled_from(["", SERVICE_NAME]), texts())))


def garbage() -> st.SearchStrategy[tuple[str, bytes]]:
    """Raw payloads for any method: random bytes, truncated varints, invalid UTF-8 in a string
    field, a length prefix past the end."""
    crafted = st.sampled_from([b"\xff" * 11, b"\x08", b"\x1a\x05ab", b"\x1a\x02\xff\xfe",
                               b"\x0a\x03\xc3\x28x", b"\x12\xff\xff\xff\xff\x0f",
                               b"\x0a\x02\x1a\x01\xff"])
    return st.tuples(st.sampled_from(list(METHODS)), st.one_of(crafted, st.binary(max_size=256)))


def cases(rpc: str, users: Sequence[int], items: Sequence[int],
          log_users: Sequence[int]) -> st.SearchStrategy:
    """The request strategy of one RPC (``garbage``: ``(method, bytes)``)."""
    return {
        "Rank": lambda: rank_requests(users, items),
        "Recommend": lambda: recommend_requests(users),
        "LogEvents": lambda: log_requests(log_users, items),
        "Health": health_requests,
        "garbage": garbage,
    }[rpc]()


def call(channel: grpc.Channel, rpc: str, request, timeout: float = 30.0,
         metadata: Sequence[tuple[str, str]] = ()) -> str:
    """Send one fuzz case; the gRPC status code's name."""
    if rpc == "garbage":
        method, payload = request
        path, parse = METHODS[method][0], METHODS[method][1]
        stub = channel.unary_unary(path, request_serializer=None, response_deserializer=parse)
    else:
        path, parse = METHODS[rpc]
        payload = request
        stub = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                   response_deserializer=parse)
    try:
        stub(payload, timeout=timeout, metadata=metadata)
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


# ---- ingest --------------------------------------------------------------------------------

EVENT_HEADER = "user_id,item_id,event_type,value,timestamp"


def _field() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["1", "2", "414", "0", "-3", "²", "1.5", "", "rating", "tag", "play",
                         "4.0", "9", "nan", "2018-01-01T00:00:00", "1500000000", "x" * 10,
                         '"quoted, comma"', '"multi\nline"', '"a ""b"""']),
        st.text(max_size=12).map(lambda s: s.replace(",", "").replace("\n", "")))


def _row() -> st.SearchStrategy[str]:
    valid = st.builds(lambda u, i, v, t: f"{u},{i},rating,{v},{t}",
                      st.integers(1, 50), st.integers(1, 20),
                      st.sampled_from(["0.5", "3", "5", "4.5"]),
                      st.integers(900_000_000, 1_500_000_000))
    return st.one_of(valid, valid, st.lists(_field(), min_size=0, max_size=7).map(",".join))


ITEM_HEADER = "item_id,title,year,genres,image_path"


def item_rows() -> st.SearchStrategy[str]:
    """items.csv rows: odd titles and years, image paths too long, absolute, climbing out."""
    image = st.sampled_from(["", "cover.jpg", "missing.jpg", "../../etc/passwd", "/etc/hostname",
                             "x" * 300 + ".jpg", "/" + "y" * 5000, "a/" * 3000 + "b.jpg",
                             "nul\x00.jpg", "²"])
    valid = st.builds(lambda i, t, y, img: f"{i},{t},{y},Drama|Comedy,{img}",
                      st.integers(1, 30), st.sampled_from(["A", "B (1999)", "Ç", "評価"]),
                      st.sampled_from(["", "1999", "²", "19x9"]), image)
    return st.one_of(valid, valid, st.lists(_field(), min_size=0, max_size=6).map(",".join))


def csv_files(header: str = EVENT_HEADER,
              rows: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[bytes]:
    """Event files in many dialects: BOM, CRLF, quoted newlines, non-UTF-8 bytes, huge fields,
    empty and header-only files, random bytes."""
    def assemble(bom: bool, newline: str, head: bool, rows: list[str], tail: bool,
                 junk: list[tuple[int, bytes]]) -> bytes:
        lines = ([header] if head else []) + rows
        text = newline.join(lines) + (newline if tail and lines else "")
        data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
        start = min(len(data), len(header) + 4) if head else 0  # the header stays readable
        for position, blob in junk:  # spliced bytes: non-UTF-8, NULs, huge fields
            at = min(len(data), start + position % (len(data) - start + 1))
            data = data[:at] + blob + data[at:]
        return data

    blobs = st.sampled_from([b"\xff", b"\xc3\x28", b"\x00", b"\xe9", b"\r", b"\n", b'"', b"huge"])
    junk = st.lists(st.tuples(st.integers(0, 10_000), blobs.map(
        lambda b: b"x" * 140_000 if b == b"huge" else b)), max_size=2)
    structured = st.builds(assemble, st.booleans(), st.sampled_from(["\n", "\r\n", "\r"]),
                           st.sampled_from([True, True, True, False]),
                           st.lists(_row() if rows is None else rows, max_size=12),
                           st.booleans(), junk)
    return st.one_of(structured, structured, structured, st.binary(max_size=512),
                     st.sampled_from([b"", header.encode(), header.encode() + b"\r\n"]))
