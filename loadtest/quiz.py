"""Short factual questions with the answers that count as right, for scoring
sampling defaults (score_defaults.py and tests/test_sampling_defaults.py).

The default model is small: these are questions it can answer, so a wrong
answer says the sampling took it off course (a far-fetched token, another
language, a loop), not that it never knew.
"""

from __future__ import annotations

import re

# (question, accepted answers: any one of them as a whole word, case-insensitive)
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the chemical formula of water?", ("H2O", "H₂O")),
    ("What gas do plants take in from the air to make food?", ("carbon dioxide", "CO2", "CO₂")),
    ("At what temperature in degrees Celsius does water freeze?", ("0", "zero")),
    ("At what temperature in degrees Celsius does water boil?", ("100",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What language is mostly spoken in Brazil?", ("Portuguese",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What do bees make?", ("honey",)),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four")),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("What is the opposite of hot?", ("cold",)),
    ("What animal is known as the king of the jungle?", ("lion",)),
]


def is_right(answer: str, accepted: tuple[str, ...]) -> bool:
    """The answer names one of the accepted answers as a whole word."""
    return any(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", answer, re.IGNORECASE) for a in accepted)


def score(answers: list[tuple[int, str]]) -> int:
    """How many (question index, answer) pairs are right."""
    return sum(is_right(text, QUESTIONS[i][1]) for i, text in answers)


def looped(answer: str, n: int = 4, times: int = 3) -> bool:
    """The answer repeats some run of n words at least `times` times (a small model stuck in a loop)."""
    words = answer.lower().split()
    runs: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        run = tuple(words[i:i + n])
        runs[run] = runs.get(run, 0) + 1
        if runs[run] >= times:
            return True
    return False
