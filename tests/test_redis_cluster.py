"""Redis Cluster: the ``redis+cluster://`` URL, Feast's cluster connection string, the local
cluster (``avrec redis --cluster``), cross-slot pipelines and the per-key compare-and-set."""

from __future__ import annotations

import pytest
import redis

from avrec import redis_server
from avrec.errors import StoreUnavailableError
from avrec.redis_client import STORE_ERRORS, connect, is_cluster, parse_cluster_url
from avrec.server import compare_and_set

from .conftest import free_port


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "127.0.0.1:7000,127.0.0.1:7001"),
        ("redis+cluster://10.0.0.1:7000/0", "10.0.0.1:7000"),
        ("redis+cluster://avrec:p%40ss@h1:7000,h2:7001/0",
         "h1:7000,h2:7001,username=avrec,password=p@ss"),
        ("rediss+cluster://h1:7000?ssl_ca_certs=%2Fca.pem&ssl_check_hostname=yes",
         "h1:7000,ssl=true,ssl_ca_certs=/ca.pem,ssl_check_hostname=true"),
    ],
)
def test_feast_cluster_connection_string(url: str, expected: str) -> None:
    assert is_cluster(url)
    assert redis_server.feast_connection_string(url) == expected
    assert redis_server.feast_redis_type(url) == "redis_cluster"


@pytest.mark.parametrize("url, message", [
    ("redis+cluster://h1:7000/1", "only database 0"),
    ("redis+cluster:///0", "no node"),
    ("redis+cluster://h1,h2:7000", "not host:port"),
])
def test_bad_cluster_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cluster_url(url)


def test_a_single_redis_url_keeps_its_client_and_feast_type() -> None:
    url = "redis://127.0.0.1:6379/3"
    assert not is_cluster(url) and redis_server.feast_redis_type(url) == "redis"
    assert type(connect(url)) is redis.Redis


def test_a_cluster_that_does_not_answer_is_a_store_error() -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()}/0"
    assert not redis_server.ping(url)
    with pytest.raises(STORE_ERRORS):
        connect(url, socket_timeout=0.2, socket_connect_timeout=0.2).get("k")
    with pytest.raises(StoreUnavailableError, match="avrec redis --cluster"):
        redis_server.ensure_redis(url)


def test_the_local_cluster_serves_cross_slot_pipelines(redis_cluster) -> None:
    assert len(redis_cluster.master_ports()) == 3
    assert all(redis_cluster.replica_of(p) for p in redis_cluster.master_ports())
    client = connect(redis_cluster.url)
    assert isinstance(client, redis.RedisCluster) and redis_server.ping(redis_cluster.url)
    keys = [f"avrec-test:{i}".encode() for i in range(200)]
    assert len({client.get_node_from_key(k).port for k in keys}) == 3  # every shard
    with client.pipeline(transaction=False) as pipe:
        for i, key in enumerate(keys):
            pipe.hset(key, mapping={"v": i})
        pipe.execute()
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, ["v", "absent"])
        pipe.incr("avrec-test:counter")
        replies = pipe.execute()
    assert replies[:-1] == [[str(i).encode(), None] for i in range(200)]
    assert replies[-1] >= 1
    client.delete(*keys, "avrec-test:counter")


def test_compare_and_set_writes_only_an_unchanged_hash(redis_cluster) -> None:
    client = connect(redis_cluster.url)
    keys = [b"avrec-cas:1", b"avrec-cas:2", b"avrec-cas:3"]
    client.hset(keys[0], mapping={"state": b"s1", "ts": b"t1"})
    client.hset(keys[1], mapping={"state": b"s2", "ts": b"t2"})
    seen = {k: client.hmget(k, ["state", "ts"]) for k in keys}  # the third: absent
    client.hset(keys[1], "state", b"another writer")  # changed after the read
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            compare_and_set.queue(pipe, key, ["state", "ts"], seen[key],
                                  {"state": b"new", "row": b"r"})
        assert pipe.execute() == [1, 0, 1]
    assert client.hgetall(keys[0]) == {b"state": b"new", b"ts": b"t1", b"row": b"r"}
    assert client.hgetall(keys[1]) == {b"state": b"another writer", b"ts": b"t2"}
    assert client.hgetall(keys[2]) == {b"state": b"new", b"row": b"r"}
    client.delete(*keys)
