"""Three example agents, each three dependent LLM calls."""

from __future__ import annotations

from typing import ClassVar

from aios.sdk import Agent


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


class Planner(Agent):
    """plan -> answer -> check: think before answering, then review the answer."""

    name = "planner"
    description = "plans how to answer a question, answers it, then checks the answer"
    tasks: ClassVar[tuple[str, ...]] = (
        "What is the capital of France?",
        "Why is the sky blue?",
        "How do plants make food?",
        "What is the largest ocean on Earth?",
        "Why do we have seasons?",
        "What do bees make?",
    )

    async def run(self, task: str) -> str:
        plan = await self.llm.chat(
            user(f"List two short steps to answer this question: {task}"), max_tokens=64
        )
        answer = await self.llm.chat(
            user(f"Question: {task}\nSteps: {plan.text}\nAnswer the question in one sentence."),
            max_tokens=64,
        )
        check = await self.llm.chat(
            user(
                f"Question: {task}\nAnswer: {answer.text}\nIs this answer correct? Reply yes or no."
            ),
            max_tokens=8,
        )
        return f"{answer.text.strip()} [check: {check.text.strip()}]"


class Writer(Agent):
    """draft -> summary -> title: write, condense, name; the draft is kept in the agent's
    storage (``drafts/TOPIC.md``, versioned) and the summary in its memory."""

    name = "writer"
    description = "drafts a paragraph on a topic, summarizes it, then titles it"
    tasks: ClassVar[tuple[str, ...]] = (
        "the ocean",
        "a trip to the mountains",
        "why reading is fun",
        "a robot that learns to cook",
        "the history of bread",
        "life in a big city",
    )

    async def run(self, task: str) -> str:
        draft = await self.llm.chat(user(f"Write a short paragraph about {task}."), max_tokens=96)
        summary = await self.llm.chat(
            user(f"Summarize this text in one sentence:\n{draft.text}"), max_tokens=48
        )
        title = await self.llm.chat(
            user(f"Write a title of at most five words for this text:\n{summary.text}"),
            max_tokens=16,
            stop=("\n",),
        )
        slug = "-".join(task.lower().split())
        await self.storage.write(f"drafts/{slug}.md", f"# {title.text.strip()}\n\n{draft.text}\n")
        await self.memory.add(summary.text.strip() or draft.text[:200], {"topic": task})
        return f"{title.text.strip()!s}: {summary.text.strip()}"


class Quiz(Agent):
    """question -> answer -> grade: a tiny self-quiz."""

    name = "quiz"
    description = "writes a quiz question on a topic, answers it, then grades the answer"
    tasks: ClassVar[tuple[str, ...]] = (
        "animals",
        "the solar system",
        "water",
        "music",
        "the human body",
        "weather",
    )

    async def run(self, task: str) -> str:
        question = await self.llm.chat(
            user(f"Write one simple quiz question about {task}. Only the question."),
            max_tokens=40,
            stop=("\n",),
        )
        answer = await self.llm.chat(user(question.text), max_tokens=48)
        grade = await self.llm.chat(
            user(
                f"Question: {question.text}\nAnswer: {answer.text}\n"
                "Grade the answer as good or bad, in one word."
            ),
            max_tokens=8,
        )
        return f"Q: {question.text.strip()} A: {answer.text.strip()} [grade: {grade.text.strip()}]"
