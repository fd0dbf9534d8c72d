"""calc: evaluates an arithmetic expression and reports the sandbox it runs in.

The expression is parsed with ``ast`` and only numbers and arithmetic operators are
evaluated (no names, calls or attributes). The report of the sandbox as seen from inside
(uid, cgroup memory and pids limits, whether / is read-only) lets tests and users see the
policy's sandbox applied for real.
"""

import ast
import errno
import operator
import os
import time

from gateway.sdk import Agent, AgentError

agent = Agent("calc")
MAX_DIGITS = int(os.environ.get("CALC_MAX_DIGITS", "50"))
SCRATCH = "/app/scratch"  # owned by 65534 in the image (see the Dockerfile)
OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def evaluate(node):
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise AgentError("exponent too large", code="too_large")
        return OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
        return OPS[type(node.op)](evaluate(node.operand))
    raise AgentError(
        f"unsupported expression element: {type(node).__name__}", code="bad_expression"
    )


def read_int(*paths):
    for path in paths:
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            return int(raw)
        return None
    return None


def root_write():
    """Try to write where this uid may write: SCRATCH is owned by it in the image, so only
    a read-only root file system (EROFS) can refuse, not the permissions (EACCES)."""
    path = os.path.join(SCRATCH, "probe-write")
    try:
        owner = os.stat(SCRATCH).st_uid
    except OSError as e:
        return {"path": path, "dir_owner": None, "error": errno.errorcode.get(e.errno, str(e))}
    try:
        with open(path, "w"):
            pass
        os.unlink(path)
        error = None
    except OSError as e:
        error = errno.errorcode.get(e.errno, str(e))
    return {"path": path, "dir_owner": owner, "error": error}


def sandbox():
    write = root_write()
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "root_write": write,
        "memory_limit_bytes": read_int(
            "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"
        ),
        "pids_limit": read_int("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
        "root_read_only": write["error"] == "EROFS" and write["dir_owner"] == os.getuid(),
        "env_keys": sorted(os.environ),
    }


@agent.task
def handle(input, ctx):
    end = time.monotonic() + float(input.get("spin_s", 0))
    while time.monotonic() < end:
        pass
    try:
        tree = ast.parse(input["expression"], mode="eval")
    except SyntaxError as e:
        raise AgentError(f"not an expression: {e.msg}", code="bad_expression") from None
    try:
        value = evaluate(tree)
    except ZeroDivisionError:
        raise AgentError("division by zero", code="bad_expression") from None
    if len(str(abs(int(value)))) > MAX_DIGITS:
        raise AgentError("result too large", code="too_large")
    return {"value": value, "sandbox": sandbox()}


if __name__ == "__main__":
    agent.run()
