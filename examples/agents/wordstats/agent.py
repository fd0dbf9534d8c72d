"""wordstats: word counts, the most frequent words and a naive extractive summary.

Deterministic and model-free: sentences are scored by the frequency of their non-stop
words, and the best ones are returned in their original order.
"""

import re
from collections import Counter

from gateway.sdk import Agent, AgentError

agent = Agent("wordstats")

STOP = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "from",
        "has",
        "have",
        "he",
        "her",
        "his",
        "i",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "their",
        "they",
        "this",
        "to",
        "was",
        "were",
        "will",
        "with",
        "you",
        "your",
        "we",
        "our",
        "not",
    }
)
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def stats(text: str, top: int = 5, summary_sentences: int = 2) -> dict:
    words = [w.lower() for w in WORD.findall(text)]
    content = [w for w in words if w not in STOP]
    freq = Counter(content)
    sentences = [s.strip() for s in SENTENCE.split(text.strip()) if s.strip()]
    scored = sorted(
        range(len(sentences)),
        key=lambda i: (-sum(freq[w.lower()] for w in WORD.findall(sentences[i])), i),
    )
    keep = sorted(scored[:summary_sentences])
    return {
        "words": len(words),
        "sentences": len(sentences),
        "top_words": [
            {"word": w, "count": c}
            for w, c in sorted(freq.items(), key=lambda x: (-x[1], x[0]))[:top]
        ],
        "summary": " ".join(sentences[i] for i in keep),
    }


@agent.task
def handle(input, ctx):
    return stats(input["text"], input.get("top", 5), input.get("summary_sentences", 2))


@agent.message
def on_message(message, ctx):
    """A ``text.stats`` request answered directly, without a task of its own."""
    if message["kind"] != "text.stats":
        raise AgentError(f"wordstats answers text.stats, not {message['kind']}", code="bad_kind")
    payload = message["payload"]
    return stats(payload["text"], payload.get("top", 5), payload.get("summary_sentences", 2))


if __name__ == "__main__":
    agent.run()
