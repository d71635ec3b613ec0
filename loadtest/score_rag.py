#!/usr/bin/env python3
"""Scores RAG templates (--rag-template / a profile's rag_template): made-up facts the model cannot know,
each asked with its document among distractors, the documents put into the question by each template
exactly as the service would (Shaper.conversation: documents joined by a blank line, then the template),
several seeds each, with the service's default sampling. Prints how many answers name the right value.

    python loadtest/score_rag.py                     # starts the service on the default model
    python loadtest/score_rag.py --base-url http://127.0.0.1:16070
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

import aiohttp

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.servers import LOADTEST, ManagedServer, free_ports  # noqa: E402

TEMPLATES = {
    "bare (documents, blank line, question)": "{context}\n\n{question}",
    "labelled blocks": "Use the documents to answer.\n\n### Documents\n{context}\n\n### Question\n{question}",
}
FACTS = [  # (document, question, the value a right answer names)
    ("The access code for the vault is 7391.", "What is the access code for the vault?", "7391"),
    ("Zorblax Corp was founded in the town of Vellmoor.", "In which town was Zorblax Corp founded?", "Vellmoor"),
    ("The project lead of Operation Tidewater is Maren Koss.", "Who leads Operation Tidewater?", "Koss"),
    ("The Kelvar bridge is 412 meters long.", "How long is the Kelvar bridge?", "412"),
    ("Our support line opens at 7:45 in the morning.", "When does the support line open?", "7:45"),
    ("The mascot of the Brindle Falcons is a badger named Pim.", "What is the name of the Brindle Falcons' mascot?",
     "Pim"),
    ("Invoice 5521 was paid on the 3rd of March.", "When was invoice 5521 paid?", "3rd of March"),
    ("The server room is on the fourth floor, room 4C.", "Which room is the server room?", "4C"),
    ("Dr. Ilsa Varn discovered the mineral quorzite.", "Who discovered quorzite?", "Varn"),
    ("The Wi-Fi password in the lobby is sunflower88.", "What is the lobby Wi-Fi password?", "sunflower88"),
    ("The ferry to Oskel island leaves from pier 9.", "From which pier does the ferry to Oskel island leave?", "9"),
    ("The warranty on the T-200 drill lasts 30 months.", "How long is the T-200 drill's warranty?", "30"),
    ("Team Amber's weekly meeting is on Thursdays.", "On which day does Team Amber meet?", "Thursday"),
    ("The recipe calls for 250 grams of rye flour.", "How much rye flour does the recipe need?", "250"),
    ("The lighthouse keeper at Corran Point is Edda Flint.", "Who keeps the lighthouse at Corran Point?", "Flint"),
    ("Parcel QX-88 was sent to Lisbon.", "Where was parcel QX-88 sent?", "Lisbon"),
]


def question(template: str, fact: int, seed: int, distractors: int) -> str:
    rng = random.Random(fact * 1000 + seed)
    docs = [FACTS[fact][0]] + [FACTS[j][0] for j in rng.sample([j for j in range(len(FACTS)) if j != fact],
                                                               distractors)]
    rng.shuffle(docs)
    return template.format(context="\n\n".join(docs), question=FACTS[fact][1])


async def score(base_url: str, seeds: int, distractors: int) -> dict[str, int]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one(template: str, fact: int, seed: int) -> bool:
            body = {"messages": [{"role": "user", "content": question(template, fact, seed, distractors)}],
                    "seed": seed, "max_tokens": 48}
            async with session.post(base_url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                answer = (await r.json())["choices"][0]["message"]["content"]
            return FACTS[fact][2].lower() in answer.lower()

        return {name: sum(await asyncio.gather(*(one(t, f, s) for f in range(len(FACTS))
                                                 for s in range(1, seeds + 1))))
                for name, t in TEMPLATES.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="a running service (default: start one on the default model)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--distractors", type=int, default=2, help="other documents beside the right one")
    args = p.parse_args()
    server = None
    if not args.base_url:
        port, grpc_port = free_ports(2)
        server = ManagedServer("rag-service", [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port",
                                               str(port), "--grpc-port", str(grpc_port), "--parallel", "8",
                                               "--ctx-size", "8192"], port, LOADTEST / "results" / "logs")
        server.wait_ready(300)
    try:
        scores = asyncio.run(score(args.base_url or server.base_url, args.seeds, args.distractors))
    finally:
        if server:
            server.stop()
    total = len(FACTS) * args.seeds
    for name, right in scores.items():
        print(f"{name:<42} {right:>3} / {total} right ({right / total:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
