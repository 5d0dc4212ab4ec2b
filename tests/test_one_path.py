"""One path to an agent's data: whichever route a memory or storage operation takes (the
syscall API, a built-in or third-party tool acting as its caller, memory-aware chat, an MCP
client, the CLI), it passes the same access check and approval rule and lands in the audit
log. Each route is tried with a capability denied and with an approval rule."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from fakes import CORE_DEFAULTS, FakeFactory, asked
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from servers import serve
from typer.testing import CliRunner

from aios.access import Access
from aios.cli import app
from aios.config import AccessConfig, CoreConfig, KernelConfig, StorageConfig
from aios.errors import InvalidRequest, PermissionDenied
from aios.identity import Identities
from aios.kernel import Kernel
from aios.storage.db import Database
from aios.storage.files import Principal
from aios.syscall import LLMCall, MemoryUse, Message, SamplingParams
from aios.tools.spec import ToolContext, tool

# Tools and the LLM, but not memory or storage: what the attack run's agent had.
TOOLS_ONLY = {"default": ("llm.*", "tools.list", "tools.call:*")}
EVERYTHING = {"default": ("llm.*", "memory.*", "storage.*", "tools.list", "tools.call:*")}
DATA_TOOLS: list[tuple[str, dict[str, Any], str]] = [
    ("write_file", {"path": "x.txt", "content": "hi"}, "storage.write"),
    ("read_file", {"path": "x.txt"}, "storage.read"),
    ("list_files", {}, "storage.ls"),
    ("remember", {"text": "a note"}, "memory.add"),
    ("recall", {"query": "note"}, "memory.search"),
]


@tool(timeout=10.0)
async def stash(text: str, ctx: ToolContext) -> str:
    """A third-party tool that keeps text in its caller's files."""
    await ctx.call("storage", "write", {"path": "stash.txt", "content": text})
    return "kept"


def kernel(tmp_path: Path, **access: Any) -> Kernel:
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        storage=StorageConfig(database=str(tmp_path / "aios.db")),
        access=AccessConfig(**{"approval_timeout": 0.3, **access}),
    )
    k = Kernel(config, engine_factory=FakeFactory(lambda p: "an answer"))
    k.tools.register(stash)
    return k


def audit(db: Path) -> list[tuple[str, str, str, str, str]]:
    """(principal, process, capability, decision, outcome) of every record."""
    conn = Database.open(str(db)).connect()
    try:
        rows = conn.all(
            "SELECT principal, process, kind, op, decision, outcome FROM audit ORDER BY seq"
        )
    finally:
        conn.close()
    return [(p, proc, f"{k}.{o}", d, out) for p, proc, k, o, d, out in rows]


def rows(db: Path, table: str) -> int:
    conn = Database.open(str(db)).connect()
    try:
        return int(conn.scalar(f"SELECT COUNT(*) FROM {table}"))
    finally:
        conn.close()


# -- tool contexts --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "arguments", "cap"), DATA_TOOLS)
async def test_a_builtin_tool_cannot_do_what_its_caller_may_not(
    tmp_path: Path, name: str, arguments: dict[str, Any], cap: str
) -> None:
    async with kernel(tmp_path, groups=TOOLS_ONLY) as k:
        p = k.register("agent", owner="mallory")
        with pytest.raises(PermissionDenied, match=cap):
            await k.resource(p, "tools", "call", {"name": name, "arguments": arguments})
        await k.audit.flush()
    records = audit(tmp_path / "aios.db")
    assert ("mallory", p.id, cap, "denied", "permission_denied") in records
    assert ("mallory", p.id, "tools.call", "allowed", "failed:permission_denied") in records
    assert rows(tmp_path / "aios.db", "files") == rows(tmp_path / "aios.db", "notes") == 0


async def test_a_third_party_tool_acts_as_its_caller(tmp_path: Path) -> None:
    async with kernel(tmp_path, groups=TOOLS_ONLY) as k:
        p = k.register("agent", owner="mallory")
        with pytest.raises(PermissionDenied, match=r"storage\.write"):
            await k.resource(p, "tools", "call", {"name": "stash", "arguments": {"text": "t"}})
    assert rows(tmp_path / "aios.db", "files") == 0


async def test_a_tool_write_waits_for_the_approval_a_direct_write_needs(tmp_path: Path) -> None:
    async with kernel(tmp_path, approve=("storage.write:*",), approval_timeout=5.0) as k:
        p = k.register("agent", owner="alice")
        write = {"name": "write_file", "arguments": {"path": "x.txt", "content": "v1"}}
        approvals = asked(k)
        call = asyncio.ensure_future(k.resource(p, "tools", "call", write))
        pending = await approvals.get()
        assert list(k.access.pending.values()) == [pending]
        assert pending.capability == "storage.write:x.txt" and pending.principal == "alice"
        assert not call.done()  # nothing is written before a person decides
        assert rows(tmp_path / "aios.db", "files") == 0
        k.access.resolve(pending.id, allow=False)
        with pytest.raises(PermissionDenied, match="denied"):
            await call
        assert rows(tmp_path / "aios.db", "files") == 0
        call = asyncio.ensure_future(k.resource(p, "tools", "call", write))
        k.access.resolve((await approvals.get()).id, allow=True)
        assert (await call)["version"] >= 1
        await k.audit.flush()
    records = audit(tmp_path / "aios.db")
    assert ("alice", p.id, "storage.write", "rejected", "failed:permission_denied") in records
    assert ("alice", p.id, "storage.write", "approved", "done") in records


@pytest.mark.parametrize(
    "args",
    [{"owner": {"": 2147483648}}, {"owner": "bob"}, {"owner": 7, "path": "x"}],
)
async def test_arguments_that_do_not_fit_are_refused_before_anyone_is_asked(
    tmp_path: Path, args: dict[str, Any]
) -> None:
    async with kernel(tmp_path, approval_timeout=30.0) as k:
        p = k.register("agent", owner="alice")
        with pytest.raises(InvalidRequest):
            await asyncio.wait_for(k.resource(p, "storage", "delete", args), 5)
        assert k.access.pending == {}


# -- memory-aware chat ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("use", "cap"),
    [
        (MemoryUse(recall=3), "memory.search"),
        (MemoryUse(history=True), "memory.history"),
        (MemoryUse(remember=True), "memory.remember"),
    ],
)
async def test_memory_aware_chat_is_made_of_checked_memory_syscalls(
    tmp_path: Path, use: MemoryUse, cap: str
) -> None:
    call = LLMCall(messages=(Message("user", "what did I note about the meeting?"),))
    async with kernel(tmp_path, groups=TOOLS_ONLY) as k:
        p = k.register("agent", owner="mallory")
        with pytest.raises(PermissionDenied, match=cap):
            await k.llm(p, call, memory=use)
        await k.audit.flush()
    assert ("mallory", p.id, cap, "denied", "permission_denied") in audit(tmp_path / "aios.db")
    assert rows(tmp_path / "aios.db", "history") == 0


async def test_memory_aware_chat_is_audited_and_follows_approvals(tmp_path: Path) -> None:
    call = LLMCall(messages=(Message("user", "the meeting is on tuesday"),))
    async with kernel(tmp_path, approve=("memory.remember",)) as k:
        p = k.register("agent", owner="alice")
        await k.resource(p, "memory", "add", {"text": "meeting tuesday at noon"})
        done = await k.llm(p, call, memory=MemoryUse(history=True, recall=2))
        assert done.context is not None  # the note was recalled (fitted in, or not)
        assert done.context["notes_used"] + done.context["notes_dropped"] == [1]
        with pytest.raises(PermissionDenied, match="approval"):  # nobody approves in time
            await k.llm(p, call, memory=MemoryUse(remember=True))
        await k.audit.flush()
    caps = [(c, d) for _, _, c, d, _ in audit(tmp_path / "aios.db")]
    assert ("memory.history", "allowed") in caps and ("memory.search", "allowed") in caps
    assert ("memory.remember", "rejected") in caps
    assert rows(tmp_path / "aios.db", "history") == 0


# -- the HTTP routes: the syscall API, /v1, MCP --------------------------------------------
def test_http_routes_deny_and_audit(tmp_path: Path) -> None:
    access = AccessConfig(groups={"default": ("tools.list", "tools.call:*"), "talkers": ("llm.*",)})
    chat = {"messages": [{"role": "user", "content": "what did I note?"}]}
    with serve(tmp_path / "data", access=access, keep=True) as server:
        http = server.client(server.agent("mallory"))
        assert (
            http.post("/api/v1/storage/write", json={"path": "a", "content": "b"}).status_code
            == 403
        )
        called = http.post("/api/v1/tools/call", json={"name": "write_file",
                           "arguments": {"path": "a", "content": "b"}})  # fmt: skip
        assert called.status_code == 403 and "storage.write" in called.text
        assert http.post("/api/v1/llm/chat", json=chat).status_code == 403
        assert http.post("/v1/chat/completions", json={**chat, "model": "fake"}).status_code == 403
        made = server.reader(server.admin).post(
            "/api/v1/agents", json={"name": "talker", "groups": ["talkers"]}
        )
        talker = server.client(made.json()["token"])
        assert talker.post("/api/v1/llm/chat", json=chat).status_code == 200
        recall = talker.post("/api/v1/llm/chat", json={**chat, "memory": {"recall": 2}})
        assert recall.status_code == 403 and "memory.search" in recall.text
    records = audit(tmp_path / "data" / "aios.db")
    mine = [(c, d) for who, _, c, d, _ in records if who == "mallory"]
    assert ("storage.write", "denied") in mine and ("llm.chat", "denied") in mine
    assert mine.count(("llm.chat", "denied")) == 2  # the syscall API and /v1
    assert ("memory.search", "denied") in [(c, d) for who, _, c, d, _ in records if who == "talker"]
    assert rows(tmp_path / "data" / "aios.db", "files") == 0


async def mcp_call(url: str, token: str, name: str, arguments: dict[str, Any]) -> Any:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "aios.cli", "mcp", "serve", "--url", url, "--token", token],
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        return await session.call_tool(name, arguments)


@pytest.mark.parametrize(
    ("access", "says"),
    [
        (AccessConfig(groups=TOOLS_ONLY), "storage.write is not allowed"),
        (AccessConfig(groups=EVERYTHING, approve=("storage.write:*",), approval_timeout=0.5),
         "needs approval and was denied"),
    ],
)  # fmt: skip
def test_mcp_tools_pass_the_same_check(tmp_path: Path, access: AccessConfig, says: str) -> None:
    with serve(tmp_path / "data", access=access, keep=True) as server:
        token = server.agent("mcp-user")
        arguments = {"path": "x.txt", "content": "hi"}
        result = asyncio.run(mcp_call(server.url, token, "write_file", arguments))
        assert result.isError and says in result.content[0].text
    records = audit(tmp_path / "data" / "aios.db")
    assert any(who == "mcp-user" and c == "storage.write" for who, _, c, _, _ in records)
    assert rows(tmp_path / "data" / "aios.db", "files") == 0


# -- the CLI ----------------------------------------------------------------------------------
def cli_setup(tmp_path: Path, access: str) -> tuple[list[str], Path]:
    """A database where alice has notes/a.txt (two versions) and a note; the CLI's options
    for a config with ``access`` (TOML lines of [kernel.access])."""
    db = tmp_path / "aios.db"

    async def fill() -> None:
        async with kernel(tmp_path) as k:
            p = k.register("agent", owner="alice")
            for text in ("v1", "v2"):
                await k.resource(p, "storage", "write", {"path": "notes/a.txt", "content": text})
            await k.resource(p, "memory", "add", {"text": "meeting tuesday"})

    asyncio.run(fill())
    config = tmp_path / "aios.toml"
    config.write_text(f"[server]\ndata_dir = '{tmp_path / 'data'}'\n[kernel.access]\n{access}\n")
    return ["--config", str(config), "--database", str(db)], db


def test_cli_data_commands_go_through_the_kernel_and_are_audited(tmp_path: Path) -> None:
    options, db = cli_setup(tmp_path, "")
    cli = CliRunner()
    cat = cli.invoke(app, ["storage", "cat", "alice", "notes/a.txt", *options])
    assert cat.exit_code == 0 and cat.stdout == "v2", cat.output
    listed = cli.invoke(app, ["storage", "ls", "alice", "-r", *options], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "notes/a.txt" in listed.stdout, listed.output
    found = cli.invoke(app, ["memory", "search", "alice", "meeting", *options])
    assert found.exit_code == 0 and "meeting tuesday" in found.stdout, found.output
    history = cli.invoke(app, ["storage", "history", "alice", "notes/a.txt", *options])
    assert history.exit_code == 0 and history.stdout.count("write") == 2, history.output
    mine = [r for r in audit(db) if r[1].startswith("cli:")]
    assert [(who, c, d) for who, _, c, d, _ in mine] == [
        ("alice", "storage.read", "allowed"),
        ("alice", "storage.ls", "allowed"),
        ("alice", "memory.search", "allowed"),
        ("alice", "storage.history", "allowed"),
    ]


def test_cli_data_commands_are_denied_what_the_agent_is_denied(tmp_path: Path) -> None:
    options, db = cli_setup(tmp_path, "[kernel.access.groups]\ndefault = ['llm.*']")
    cli = CliRunner()
    cat = cli.invoke(app, ["storage", "cat", "alice", "notes/a.txt", *options])
    assert cat.exit_code == 1 and "storage.read is not allowed" in cat.output
    found = cli.invoke(app, ["memory", "search", "alice", "meeting", *options])
    assert found.exit_code == 1 and "memory.search is not allowed" in found.output
    denied = [(c, d) for _, proc, c, d, _ in audit(db) if proc.startswith("cli:")]
    assert denied == [("storage.read", "denied"), ("memory.search", "denied")]


def test_cli_rollback_follows_the_approval_rule(tmp_path: Path) -> None:
    options, db = cli_setup(tmp_path, "approve = ['storage.rollback:*']")
    cli = CliRunner()  # stdin is not a terminal: nobody can approve, so it is denied
    back = cli.invoke(app, ["storage", "rollback", "alice", "notes/a.txt", "--version", "1",
                            *options])  # fmt: skip
    assert back.exit_code == 1 and "needs approval" in back.output, back.output
    cat = cli.invoke(app, ["storage", "cat", "alice", "notes/a.txt", *options])
    assert cat.stdout == "v2"  # unchanged
    assert ("storage.rollback", "rejected") in [(c, d) for _, _, c, d, _ in audit(db)]


# -- names with powers --------------------------------------------------------------------------
def test_no_credential_can_claim_a_reserved_group(tmp_path: Path) -> None:
    identities = Identities(tmp_path / "ids.db", exempt=("ops",))
    for group in ("admin", "default", "ops"):
        with pytest.raises(InvalidRequest, match="reserved"):
            identities.create("g2", (group,))
    # A row written before the name was reserved gives no power.
    db = identities._db
    assert db is not None
    db.run("UPDATE identities SET groups = 'admin,ops,team'")
    _, token = identities.create("g3", ("team",))
    db.run("UPDATE identities SET groups = 'admin,team' WHERE name = 'g3'")
    identities._changed()
    found = identities.authenticate(token)
    assert found is not None and found.groups == ("team",) and not found.admin
    identities.close()


def test_the_http_api_refuses_a_reserved_group(tmp_path: Path) -> None:
    with serve(tmp_path / "data") as server:
        made = server.reader(server.admin).post(
            "/api/v1/agents", json={"name": "g2", "groups": ["admin"]}
        )
        assert made.status_code == 400 and "reserved" in made.text


def test_approvals_apply_to_admins_unless_the_policy_exempts_them() -> None:
    groups = {"default": ("tools.call:*",), "admin": ("*",), "ops": ("tools.call:*",)}
    strict = Access(AccessConfig(groups=groups, approve=("tools.call:python",)))
    root = Principal("root", frozenset({"admin"}))
    assert strict.decide(root, "tools.call:python")[0] == "approve"
    lenient = Access(AccessConfig(groups=groups, approve=("tools.call:python",), exempt=("ops",)))
    decision, why = lenient.decide(Principal("o", frozenset({"ops"})), "tools.call:python")
    assert decision == "exempt" and "ops" in why
    assert lenient.decide(root, "tools.call:python")[0] == "approve"


async def test_an_exempt_call_is_audited_as_exempt(tmp_path: Path) -> None:
    async with kernel(tmp_path, approve=("storage.write:*",), exempt=("ops",)) as k:
        p = k.register("agent", owner="olga")
        p.groups = frozenset({"ops"})
        await k.resource(p, "storage", "write", {"path": "a", "content": "b"})
        await k.audit.flush()
    assert ("olga", p.id, "storage.write", "exempt", "done") in audit(tmp_path / "aios.db")


# -- sampling parameters ---------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-40, 1e-42, 5e-324, 9e-5])
def test_a_temperature_too_small_to_sample_from_is_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, json=True)
    assert params.temperature == 0.0 and params.greedy
    assert SamplingParams(temperature=1e-3).temperature == 1e-3
