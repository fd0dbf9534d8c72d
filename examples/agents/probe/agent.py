"""probe: a diagnostic agent that exercises the hub's messaging from inside its container.

It runs a script of steps, one SDK call each, records every outcome (a refusal is an
outcome, not a crash), then waits until it has received ``expect_messages`` messages (if
given) or ``hold_s`` seconds passed, and returns ``{"results": [...], "received": [...]}``. While it
holds, other agents can reach it: it answers every message with its payload echoed (after
``payload.sleep_s`` seconds, if given).

Steps::

    {"op": "request", "to", "kind", "payload", "timeout_s"?}   -> reply
    {"op": "publish", "topic", "kind", "payload"}              -> delivered
    {"op": "broadcast", "kind", "payload"}                     -> delivered
    {"op": "delegate", "to", "input", "wait_s"?}               -> output
    {"op": "connect", "host", "port", "timeout_s"?}            -> a direct TCP connection
    {"op": "renew"}                                            -> the new token's expiry
    {"op": "result_for", "task_id", "output"}                  -> report another task's result
    {"op": "wait_messages", "count", "timeout_s"}              -> messages received so far
    {"op": "load", "to", "n", "concurrency", "direct_url"?}    -> round trips per second
    {"op": "tool", "name", "arguments"?}                       -> an MCP tool's result (/mcp)

``load`` sends ``n`` ping requests from ``concurrency`` threads, through the hub or, with
``direct_url``, straight to another agent's ``/message`` (possible only where the network
allows it: bench/bench_messages.py runs the agents as host processes for that baseline).
Messages whose payload has ``"quiet": true`` are answered but not recorded.
"""

import http.client
import json
import socket
import threading
import time
import urllib.parse

from gateway.sdk import Agent, HubError
from gateway.sdk.client import token_expiry

agent = Agent("probe")
received = []
arrived = threading.Condition()


@agent.message
def on_message(message, ctx):
    payload = message["payload"]
    if isinstance(payload, dict) and isinstance(payload.get("sleep_s"), int | float):
        time.sleep(min(payload["sleep_s"], 30))  # lets tests see a sender time out
    if isinstance(payload, dict) and payload.get("quiet"):
        return {"echo": payload, "agent": agent.name, "task_id": ctx.task_id}
    with arrived:
        received.append(
            {
                "type": message["type"],
                "kind": message["kind"],
                "payload": message["payload"],
                "from": message["from"]["agent"],
                "from_task": message["from"]["task_id"],
                "topic": message.get("topic"),
            }
        )
        arrived.notify_all()
    return {"echo": message["payload"], "agent": agent.name, "task_id": ctx.task_id}


def wait_messages(count, timeout_s):
    deadline = time.monotonic() + timeout_s
    with arrived:
        while len(received) < count and time.monotonic() < deadline:
            arrived.wait(max(0.0, deadline - time.monotonic()))
        return len(received)


def connect(host, port, timeout_s):
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return {"ok": True, "connected": True}
    except OSError as e:
        return {
            "ok": False,
            "code": type(e).__name__,
            "message": str(e) or type(e).__name__,
            "after_s": round(time.monotonic() - start, 2),
        }


def load(step, client):
    """Round trips from several threads; latencies in ms as each thread saw them."""
    n, threads = step["n"], step.get("concurrency", 1)
    direct = step.get("direct_url")
    latencies, errors = [], []
    lock = threading.Lock()
    counter = iter(range(n))
    body = {"type": "request", "kind": "ping", "payload": {"quiet": True}}

    def worker():
        conn = None
        if direct:
            parts = urllib.parse.urlsplit(direct)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            data = json.dumps({**body, "from": {"agent": agent.name}}).encode()
        mine = []
        for _ in iter(lambda: next(counter, None), None):
            start = time.perf_counter()
            try:
                if conn is not None:
                    conn.request("POST", "/message", data, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        raise HubError(resp.status, "direct", "agent refused")
                else:
                    client.request(step["to"], "ping", body["payload"])
            except (HubError, OSError, http.client.HTTPException) as e:
                with lock:
                    errors.append(str(e))
                continue
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(mine)

    start, cpu = time.perf_counter(), time.process_time()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    latencies.sort()

    def pick(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "ok": not errors,
        "n": len(latencies),
        "errors": errors[:3],
        "seconds": round(elapsed, 3),
        "per_s": round(len(latencies) / elapsed, 1),
        "cpu_s": round(cpu, 3),
        "p50_ms": round(pick(0.50), 3) if latencies else None,
        "p99_ms": round(pick(0.99), 3) if latencies else None,
    }


def run_step(step, client):
    op = step["op"]
    if op == "request":
        reply = client.request(
            step["to"], step["kind"], step["payload"], timeout_s=step.get("timeout_s")
        )
        return {"ok": True, "reply": reply}
    if op == "publish":
        return {
            "ok": True,
            "delivered": client.publish(step["topic"], step["kind"], step["payload"]),
        }
    if op == "broadcast":
        return {"ok": True, "delivered": client.broadcast(step["kind"], step["payload"])}
    if op == "delegate":
        output = client.delegate(step["to"], step["input"], wait_s=step.get("wait_s", 60))
        return {"ok": True, "output": output}
    if op == "tool":
        return {"ok": True, "result": client.call_tool(step["name"], step.get("arguments", {}))}
    if op == "connect":
        return connect(step["host"], step["port"], step.get("timeout_s", 2))
    if op == "renew":
        return {"ok": True, "expires_at": token_expiry(client.renew())}
    if op == "result_for":
        return {"ok": True, "state": client.report_result(step["task_id"], step["output"])}
    if op == "load":
        return load(step, client)
    if op == "wait_messages":
        return {"ok": True, "count": wait_messages(step["count"], step.get("timeout_s", 10))}
    return {"ok": False, "code": "unknown_op", "message": op}


@agent.task
def handle(input, ctx):
    results = []
    for step in input.get("script", []):
        try:
            outcome = run_step(step, ctx.client)
        except HubError as e:
            outcome = {"ok": False, "status": e.status, "code": e.code, "message": e.message}
        results.append({"op": step["op"], **outcome})
    # Hold until enough messages arrived; with none expected, for the whole hold_s.
    wait_messages(input.get("expect_messages") or float("inf"), input.get("hold_s", 0))
    with arrived:
        return {"results": results, "received": list(received)}


if __name__ == "__main__":
    agent.run()
