"""echo: returns its input unchanged (the smallest useful agent), and answers messages."""

from gateway.sdk import Agent

agent = Agent("echo")


@agent.task
def handle(input, ctx):
    return {"echo": input, "agent": ctx.agent}


@agent.message
def on_message(message, ctx):
    return {"echo": message["payload"], "agent": ctx.agent, "from": message["from"]["agent"]}


if __name__ == "__main__":
    agent.run()
