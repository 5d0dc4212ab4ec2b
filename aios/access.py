"""The access manager: capabilities (deny by default), human approval of sensitive calls.

A capability names what a call does: ``KIND.OP:RESOURCE``, for example ``llm.chat:default``,
``tools.call:calculator``, ``storage.write:notes/today.md``, ``storage.read:@alice/shared/x``
(another agent's file: ``@OWNER/PATH``), ``memory.add``. A policy grants patterns of them to
groups (``*`` matches anything, a pattern without ``:`` any resource); every agent is in the
group ``default`` and the groups of its credential. A call no pattern grants is denied.

Some granted calls still need a person: those matching an ``approve`` pattern, calls of tools
annotated destructive, and changes to another agent's (shared) files. They wait in the
approval queue (``aios approve list|allow|deny``) until decided or until their deadline, which
means denied. No group skips approval by its name: only the groups the policy lists in
``exempt`` do, and each skip is audited as ``exempt``. Group names the kernel gives meaning to
(``aios.identity.RESERVED_GROUPS``, and the exempt groups) cannot be claimed by a credential.
One check at syscall entry covers every kind of syscall (``Kernel.submit`` and
``Kernel.llm_stream``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aios.config import AccessConfig
from aios.errors import NotFound
from aios.quota import Quota
from aios.storage.files import Principal

Decision = Literal["allowed", "denied", "approve", "exempt"]
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
        # Called with each new pending call (the CLI asks the person at its terminal).
        self.on_ask: Callable[[Pending], None] | None = None

    def decide(
        self, who: Principal, cap: str, *, destructive: bool = False, shared_write: bool = False
    ) -> tuple[Decision, str]:
        """Pure: the decision for ``who`` doing ``cap``, and why. Approvals apply to every
        agent, except members of the policy's ``exempt`` groups ("exempt", audited as such)."""
        groups = ("default", *sorted(who.groups))
        granted = [(g, p) for g in groups for p in self.config.groups.get(g, ()) if matches(p, cap)]
        if not granted:
            return (
                "denied",
                f"no capability of {who.name!r} (groups {', '.join(groups)}) grants {cap}",
            )
        needs = self._needs_approval(cap, destructive, shared_write)
        if needs is None:
            group, pattern = granted[0]
            return "allowed", f"{pattern} (group {group})"
        exempt = next((g for g in groups if g in self.config.exempt), None)
        if exempt is not None:
            return "exempt", f"group {exempt} is exempt from approval ({needs})"
        return "approve", needs

    def _needs_approval(self, cap: str, destructive: bool, shared_write: bool) -> str | None:
        for pattern in self.config.approve:
            if matches(pattern, cap):
                return f"the policy asks approval for {pattern}"
        if destructive and self.config.approve_destructive_tools:
            return "the tool is annotated destructive"
        if shared_write and self.config.approve_shared_writes:
            return "it changes another agent's files"
        return None

    def quota(self, who: Principal, default: Quota) -> Quota:
        """``who``'s LLM quota: the most generous of its groups' quotas, else ``default``."""
        quotas = self.config.quotas
        own = [quotas[g] for g in ("default", *sorted(who.groups)) if g in quotas]
        return Quota.most_generous(own) if own else default

    def ask(
        self, who: Principal, process: str, cap: str, reason: str, *, ident: str | None = None
    ) -> Pending:
        """Queue a call for approval; its ``decided`` future resolves True (allow) or False.
        ``ident``: its id (one that stays the same across a restart), else a fresh one."""
        pending = Pending(
            ident or f"ap-{next(self._ids)}", who.name, process, cap, reason, time.time(),
            asyncio.get_running_loop().create_future(),
        )  # fmt: skip
        self.pending[pending.id] = pending
        pending.decided.add_done_callback(lambda _: self.pending.pop(pending.id, None))
        if self.on_ask is not None:
            self.on_ask(pending)
        return pending

    def resolve(self, approval_id: str, allow: bool) -> Pending:
        pending = self.pending.get(approval_id)
        if pending is None or pending.decided.done():
            raise NotFound(f"no pending approval {approval_id!r}")
        pending.decided.set_result(allow)
        return pending
