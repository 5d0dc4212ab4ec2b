"""A small shipped task set for the tool-using agents: arithmetic the model alone gets wrong,
and file chores that need its storage. Each task carries its checkable answer."""

from __future__ import annotations

MATH: tuple[tuple[str, float], ...] = (
    ("What is 347 * 29?", 10063),
    ("What is 1234 + 5678?", 6912),
    ("What is 9876 - 5432?", 4444),
    ("What is 144 / 12?", 12),
    ("What is 58 * 73?", 4234),
    ("What is 2048 + 4096?", 6144),
    ("What is 1000 - 387?", 613),
    ("What is 625 / 25?", 25),
    ("What is 123 * 456?", 56088),
    ("What is 7777 + 2223?", 10000),
    ("What is 15 * 15 * 15?", 3375),
    ("What is 9999 - 1?", 9998),
)

FILES: tuple[tuple[str, str, str], ...] = (  # (task, file, content it must hold)
    ("Save 'buy milk' in the file todo.txt, then read todo.txt.", "todo.txt", "buy milk"),
    ("Save 'meeting at noon' in the file plan.txt, then read plan.txt.", "plan.txt",
     "meeting at noon"),
    ("Save 'water the plants' in the file chores.txt, then read chores.txt.", "chores.txt",
     "water the plants"),
    ("Save 'page 42' in the file book.txt, then read book.txt.", "book.txt", "page 42"),
)  # fmt: skip
