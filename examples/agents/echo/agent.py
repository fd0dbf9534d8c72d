"""echo: returns its input unchanged (the smallest useful agent), and answers messages.

With ``ECHO_REPLY=later`` in its environment (a registry entry's ``env``) it is a background
agent: it answers ``POST /task`` with 202 and reports the same output through the hub.
"""

import os

from gateway.sdk import Agent

agent = Agent("echo")


def handle(input, ctx):
    return {"echo": input, "agent": ctx.agent}


# Chosen at start: the container's environment is fixed for its life.
(agent.background_task if os.environ.get("ECHO_REPLY") == "later" else agent.task)(handle)


@agent.message
def on_message(message, ctx):
    return {"echo": message["payload"], "agent": ctx.agent, "from": message["from"]["agent"]}


if __name__ == "__main__":
    agent.run()
