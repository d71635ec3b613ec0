"""Which requests each workload of the serving benchmark sends (the text comes
from prompts.py). Every level run passes a fresh `tag`, so no run can hit a
prompt cache filled by an earlier one."""

from __future__ import annotations

from loadtest import prompts

WORKLOADS = ("chat", "shared-prefix", "long-prompt")


def build_requests(workload: str, n: int, tag: str, args) -> list[tuple[str, list[dict]]]:
    """(kind, messages) for one level run; `tag` is fresh for every run."""
    if workload == "chat":
        return [("chat", prompts.chat_messages(tag, i)) for i in range(n)]
    if workload == "shared-prefix":
        return [("shared", prompts.shared_prefix_messages(
            tag, prompts.RAG_QUESTIONS[i % len(prompts.RAG_QUESTIONS)] + f" (#{i})",
            context_tokens=args.shared_context_tokens)) for i in range(n)]
    if workload == "long-prompt":
        out = []
        for i in range(n):
            if i % args.long_every == 0:
                out.append(("long", prompts.long_prompt_messages(tag, i, prompt_tokens=args.long_tokens)))
            else:
                out.append(("short", prompts.chat_messages(tag, i)))
        return out
    raise ValueError(f"unknown workload {workload!r}")


def priming_messages(tag: str, args) -> list[dict]:
    """The untimed request that shows a shared-prefix run's prefix to the server first: the
    platform's steady state, where the system prompt and RAG context were seen before."""
    return prompts.shared_prefix_messages(tag, "What is this document about?",
                                          context_tokens=args.shared_context_tokens)
