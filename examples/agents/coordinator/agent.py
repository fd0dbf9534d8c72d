"""coordinator: splits a document, delegates the parts to wordstats, merges the results.

It answers ``POST /task`` with 202 at once (a background task) and reports the merged
result through the hub when every part is done. Each part is a child task of this one,
created through the hub (``ctx.client.start_delegate``), so it passes the same schema and
dispatch policy as a task a user submits and runs in a container of its own; the message
policy decides whether the coordinator may delegate to wordstats at all.
"""

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from gateway.sdk import Agent, AgentError, HubError

agent = Agent("coordinator")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
PART_TOP = 50  # each part reports this many words, so the merged top list is exact enough


def split(text, parts):
    """Contiguous groups of whole sentences, as even in count as possible."""
    sentences = [s.strip() for s in SENTENCE.split(text.strip()) if s.strip()]
    parts = max(1, min(parts, len(sentences)))
    size, extra = divmod(len(sentences), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(" ".join(sentences[start:end]))
        start = end
    return chunks


def merge(results, top):
    counts = Counter()
    for r in results:
        for item in r["top_words"]:
            counts[item["word"]] += item["count"]
    return {
        "words": sum(r["words"] for r in results),
        "sentences": sum(r["sentences"] for r in results),
        "top_words": [
            {"word": w, "count": c} for w, c in sorted(counts.items(), key=lambda x: (-x[1], x[0]))
        ][:top],
        "summary": " ".join(r["summary"] for r in results if r["summary"]),
    }


@agent.background_task
def handle(input, ctx):
    chunks = split(input["text"], input.get("parts", 2))
    top = input.get("top", 5)

    def run(chunk):
        child = ctx.client.start_delegate(
            "wordstats", {"text": chunk, "top": PART_TOP, "summary_sentences": 1}, wait_s=25
        )
        return ctx.client.wait_task(child, 60)

    try:
        with ThreadPoolExecutor(len(chunks)) as pool:
            children = list(pool.map(run, chunks))
    except HubError as e:
        raise AgentError(f"delegation refused: {e.message}", code="delegation_failed") from None
    failed = [c for c in children if c["state"] != "succeeded"]
    if failed:
        raise AgentError(
            f"{len(failed)} of {len(children)} parts failed: {failed[0].get('error')}",
            code="part_failed",
        )
    return {
        "parts": len(children),
        "children": [c["task_id"] for c in children],
        **merge([c["result"] for c in children], top),
    }


if __name__ == "__main__":
    agent.run()
