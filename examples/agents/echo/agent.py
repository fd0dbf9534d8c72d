"""echo: returns its input unchanged (the smallest useful agent)."""

from gateway.sdk import Agent

agent = Agent("echo")


@agent.task
def handle(input, ctx):
    return {"echo": input, "agent": ctx.agent}


if __name__ == "__main__":
    agent.run()
