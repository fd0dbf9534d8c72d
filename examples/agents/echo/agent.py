"""echo: returns its input unchanged (the smallest useful agent), and answers messages.

With ``progress_steps`` (1 to 20) in its input it first reports that many progress events
(``ctx.progress``), ``progress_delay_s`` apart (default 0.05 s, at most 1 s), which is what the
stream tests and the progress-latency benchmark watch.

With ``ECHO_REPLY=later`` in its environment (a registry entry's ``env``) it is a background
agent: it answers ``POST /task`` with 202 and reports the same output through the hub.
"""

import os
import time

from gateway.sdk import Agent

agent = Agent("echo")


def handle(input, ctx):
    steps = input.get("progress_steps") if isinstance(input, dict) else None
    if isinstance(steps, int) and 1 <= steps <= 20:
        delay = input.get("progress_delay_s", 0.05)
        delay = min(max(float(delay), 0.0), 1.0) if isinstance(delay, int | float) else 0.05
        for step in range(1, steps + 1):
            time.sleep(delay)
            ctx.progress(f"step {step} of {steps}", step / steps)
    return {"echo": input, "agent": ctx.agent}


# Chosen at start: the container's environment is fixed for its life.
(agent.background_task if os.environ.get("ECHO_REPLY") == "later" else agent.task)(handle)


@agent.message
def on_message(message, ctx):
    return {"echo": message["payload"], "agent": ctx.agent, "from": message["from"]["agent"]}


if __name__ == "__main__":
    agent.run()
