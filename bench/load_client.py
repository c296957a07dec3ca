"""A client process of ``bench/load_gen.py`` (spawned by :func:`load_gen.run_point`): one
``grpc.aio`` channel, its share of the load (an open-loop schedule or closed-loop callers),
and its measured calls and CPU sent back through a pipe."""

from __future__ import annotations

import asyncio
import random
import resource
import time

from load_schedule import LOAD_USERS, METHODS, arrivals
from load_stats import Calls

POOL = 256  # prebuilt Rank/Recommend requests per process (kept off the client's hot path)


def _requests(spec: dict, rng: random.Random) -> dict:
    from avrec.server.protocol import ranking_pb2

    users, items = spec["users"], spec["items"]
    return {
        "rank": [ranking_pb2.RankRequest(
            user_id=rng.choice(users), candidate_item_ids=rng.sample(items, spec["candidates"]))
            for _ in range(POOL)],
        "recommend": [ranking_pb2.RecommendRequest(user_id=rng.choice(users), top_k=20)
                      for _ in range(POOL)],
    }


def _log_request(items: list[int], rng: random.Random):
    from avrec.server.protocol import ranking_pb2

    return ranking_pb2.LogEventsRequest(events=[ranking_pb2.Event(
        user_id=rng.randrange(*LOAD_USERS), item_id=rng.choice(items), event_type="rating",
        rating=rng.choice([1.0, 2.5, 3.0, 4.0, 4.5, 5.0])) for _ in range(rng.randint(1, 3))])


def cpu_seconds() -> float:
    """User + system CPU of this process, every thread (gRPC's C threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(spec: dict, conn) -> dict:
    import grpc

    from avrec.server.client import channel_options
    from avrec.server.protocol import ranking_pb2_grpc

    rng = random.Random(spec["seed"])
    pool = _requests(spec, rng)
    weights = spec["mix"]
    timeout = spec["timeout"]
    # round_robin over a multi-replica target, Rank/Recommend retried on UNAVAILABLE
    async with grpc.aio.insecure_channel(spec["target"], options=channel_options()) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        rpc = {"rank": stub.Rank, "recommend": stub.Recommend, "logevents": stub.LogEvents}
        await asyncio.wait_for(channel.channel_ready(), 30)
        conn.send("ready")
        start_wall = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        t0 = time.perf_counter() + (start_wall - time.time())
        warm_end = t0 + spec["warmup"]
        end = warm_end + spec["seconds"]
        calls = Calls()
        counter = [0]

        async def call(scheduled: float) -> None:
            method = rng.choices(METHODS, weights)[0]
            if method == "logevents":
                request = _log_request(spec["items"], rng)
            else:
                counter[0] += 1
                request = pool[method][counter[0] % POOL]
            sent = time.perf_counter()
            try:
                await rpc[method](request, timeout=timeout)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            done = time.perf_counter()
            if scheduled >= warm_end:
                calls.method.append(method)
                calls.code.append(code)
                calls.scheduled.append(scheduled - warm_end)
                calls.latency.append(done - scheduled)
                calls.lag.append(sent - scheduled)

        cpu = {}

        async def mark() -> None:
            await asyncio.sleep(max(0.0, warm_end - time.perf_counter()))
            cpu["start"] = cpu_seconds()

        marker = asyncio.create_task(mark())
        if spec["mode"] == "open":
            tasks = []
            for offset in arrivals(spec["rate"], spec["warmup"] + spec["seconds"],
                                   spec["schedule"], spec["seed"], spec["phase"]):
                scheduled = t0 + float(offset)
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(call(scheduled)))
            await asyncio.gather(*tasks)
        else:
            await asyncio.sleep(max(0.0, t0 - time.perf_counter()))

            async def caller() -> None:
                while (now := time.perf_counter()) < end:
                    await call(now)

            await asyncio.gather(*(caller() for _ in range(spec["callers"])))
        await marker
        return {"calls": calls, "cpu": cpu_seconds() - cpu["start"]}


def worker(spec: dict, conn) -> None:
    """One client process: its share of the load, then its measured calls through ``conn``."""
    try:
        conn.send(asyncio.run(_drive(spec, conn)))
    except Exception as error:  # reported by the parent
        conn.send(error)
    finally:
        conn.close()
