"""A batchd producer and consumer in Python with nats-py (pip install nats-py).

Publishes tasks to batchd.tasks.p1|p2|p3 with Nats-Msg-Id and waits for the
JetStream PubAck, then reads each task's one outcome from the results
stream (batchd.results.<task_id>). See docs/PROTOCOL.md.

    python3 examples/python/producer_consumer.py --nats-url nats://127.0.0.1:4222 --tasks 10
"""

import argparse
import asyncio
import json
import sys
import uuid

import nats


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()

    # Producer: one task per priority in turn; the PubAck means batchd will
    # publish exactly one outcome for it.
    run = uuid.uuid4().hex[:8]
    ids = []
    for i in range(args.tasks):
        priority = i % 3 + 1
        task_id = f"py_{run}_{i}"
        task = {
            "task_id": task_id,
            "type": "summarization",
            "payload": {"text": f"Document {i} about NATS and batching.",
                        "options": {"language": "en", "max_words": 20}},
            "priority": priority,
            "tenant": "python-example",
        }
        await js.publish(f"batchd.tasks.p{priority}", json.dumps(task).encode(),
                         headers={"Nats-Msg-Id": task_id, "Content-Type": "application/json"})
        ids.append(task_id)
    print(f"published {len(ids)} tasks")

    # Consumer: the outcome of each task is the last message on its subject.
    failed = 0
    for task_id in ids:
        outcome = None
        deadline = asyncio.get_running_loop().time() + args.timeout
        while outcome is None:
            try:
                msg = await js.get_last_msg("BATCHD_RESULTS", f"batchd.results.{task_id}")
                outcome = json.loads(msg.data)
            except nats.js.errors.NotFoundError:
                if asyncio.get_running_loop().time() > deadline:
                    print(f"{task_id}: no outcome after {args.timeout} s", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.1)
        if outcome["status"] != "succeeded":
            failed += 1
        print(f"{task_id}: {outcome['status']} model={outcome['model']} cost=${outcome['cost_usd']:.6f}")
    await nc.drain()
    print(f"{len(ids) - failed} succeeded, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
