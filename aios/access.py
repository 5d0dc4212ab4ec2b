"""The access manager: capabilities (deny by default), human approval of sensitive calls.

A capability names what a call does: ``KIND.OP:RESOURCE``, for example ``llm.chat:default``,
``tools.call:calculator``, ``storage.write:notes/today.md``, ``storage.read:@alice/shared/x``
(another agent's file: ``@OWNER/PATH``), ``memory.add``. A policy grants patterns of them to
groups (``*`` matches anything, a pattern without ``:`` any resource); every agent is in the
group ``default`` and the groups of its credential. A call no pattern grants is denied.

Some granted calls still need a person: those matching an ``approve`` pattern, calls of tools
annotated destructive, and changes to another agent's (shared) files. They wait in the
approval queue (``aios approve list|allow|deny``) until decided or until their deadline, which
means denied. One check at syscall entry covers every kind of syscall (``Kernel.submit`` and
``Kernel.llm_stream``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import time
from dataclasses import dataclass
from typing import Any, Literal

from aios.config import AccessConfig
from aios.errors import NotFound
from aios.quota import Quota
from aios.storage.files import Principal

Decision = Literal["allowed", "denied", "approve"]
WRITES = frozenset({"write", "delete", "mkdir", "move", "rollback"})


def capability(kind: str, op: str, resource: str = "") -> str:
    return f"{kind}.{op}:{resource}" if resource else f"{kind}.{op}"


def matches(pattern: str, cap: str) -> bool:
    if ":" not in pattern:
        cap = cap.split(":", 1)[0]
    return fnmatch.fnmatchcase(cap, pattern)


@dataclass
class Pending:
    """A call waiting for a person's decision."""

    id: str
    principal: str
    process: str
    capability: str
    reason: str
    created: float
    decided: asyncio.Future[bool]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "principal": self.principal,
            "process": self.process,
            "capability": self.capability,
            "reason": self.reason,
            "age_s": time.time() - self.created,
        }


class Access:
    def __init__(self, config: AccessConfig | None = None) -> None:
        self.config = config or AccessConfig()
        self.pending: dict[str, Pending] = {}
        self._ids = itertools.count(1)

    def decide(
        self, who: Principal, cap: str, *, destructive: bool = False, shared_write: bool = False
    ) -> tuple[Decision, str]:
        """Pure: the decision for ``who`` doing ``cap``, and why."""
        groups = ("default", *sorted(who.groups))
        granted = [(g, p) for g in groups for p in self.config.groups.get(g, ()) if matches(p, cap)]
        if not granted:
            return (
                "denied",
                f"no capability of {who.name!r} (groups {', '.join(groups)}) grants {cap}",
            )
        if "*" in self.config.groups.get("admin", ()) and "admin" in who.groups:
            return "allowed", "admin"
        for pattern in self.config.approve:
            if matches(pattern, cap):
                return "approve", f"the policy asks approval for {pattern}"
        if destructive and self.config.approve_destructive_tools:
            return "approve", "the tool is annotated destructive"
        if shared_write and self.config.approve_shared_writes:
            return "approve", "it changes another agent's files"
        group, pattern = granted[0]
        return "allowed", f"{pattern} (group {group})"

    def quota(self, who: Principal, default: Quota) -> Quota:
        """``who``'s LLM quota: the most generous of its groups' quotas, else ``default``."""
        quotas = self.config.quotas
        own = [quotas[g] for g in ("default", *sorted(who.groups)) if g in quotas]
        return Quota.most_generous(own) if own else default

    def ask(self, who: Principal, process: str, cap: str, reason: str) -> Pending:
        """Queue a call for approval; its ``decided`` future resolves True (allow) or False."""
        pending = Pending(
            f"ap-{next(self._ids)}", who.name, process, cap, reason, time.time(),
            asyncio.get_running_loop().create_future(),
        )  # fmt: skip
        self.pending[pending.id] = pending
        pending.decided.add_done_callback(lambda _: self.pending.pop(pending.id, None))
        return pending

    def resolve(self, approval_id: str, allow: bool) -> Pending:
        pending = self.pending.get(approval_id)
        if pending is None or pending.decided.done():
            raise NotFound(f"no pending approval {approval_id!r}")
        pending.decided.set_result(allow)
        return pending
