"""An MCP server over the SDK: the memory service's tools for any MCP client.

    MEMORY_BASE_URL=http://localhost:8000 MEMORY_API_KEY=... python -m memoryclient.mcp
    python -m memoryclient.mcp --transport http --port 8765     # streamable HTTP at /mcp

Built on the official `mcp` package (the `memoryclient[mcp]` extra): each tool's input schema
comes from its type hints. A refusal of the service is the tool's error, with its message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from mcp.server.mcpserver import MCPServer

from memoryclient.client import MemoryClient

INSTRUCTIONS = (
    "Long-term memory of the users you talk with. Search before answering about a user; add what "
    "you learn about them (add_memory); correct a memory that is wrong (update_memory)."
)


def build_server(client: MemoryClient) -> MCPServer[Any]:
    """The MCP server whose tools call `client`."""
    server: MCPServer[Any] = MCPServer(name="memory", instructions=INSTRUCTIONS)

    @server.tool()
    def add_memory(
        user_id: str, content: str, role: str = "user", wait_seconds: float = 10.0
    ) -> dict[str, Any]:
        """Remember what a user said: the service extracts the facts worth keeping from
        `content` (a message of `role`). Waits up to `wait_seconds` (at most 20) for the job;
        returns its status with the memories it added, updated or closed (`events`)."""
        messages = [{"role": role, "content": content}]
        return client.add(user_id, messages, wait=min(max(wait_seconds, 0.0), 20.0) or None)

    @server.tool()
    def search_memories(user_id: str, query: str, limit: int = 10) -> list[dict[str, Any]]:
        """The user's memories most relevant to `query`, best first, each with its `score`."""
        return client.search(user_id, query, limit=limit)

    @server.tool()
    def get_memory(memory_id: str) -> dict[str, Any]:
        """One memory by id (its content, type, version and dates)."""
        return client.get(memory_id)

    @server.tool()
    def update_memory(
        memory_id: str, content: str, if_version: int | None = None
    ) -> dict[str, Any]:
        """Correct a memory's content. With `if_version`, refused if it changed since then."""
        return client.update(memory_id, content=content, if_version=if_version)

    @server.tool()
    def delete_memory(memory_id: str) -> str:
        """Forget a memory for good (its content is erased)."""
        client.delete(memory_id)
        return f"deleted {memory_id}"

    @server.tool()
    def list_memories(user_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The user's current memories, newest first (at most `limit`)."""
        found: list[dict[str, Any]] = []
        for memory in client.list(user_id, limit=min(max(limit, 1), 500)):
            found.append(memory)
            if len(found) >= limit:
                break
        return found

    return server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memoryclient.mcp", description=__doc__)
    parser.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    base_url, api_key = os.environ.get("MEMORY_BASE_URL"), os.environ.get("MEMORY_API_KEY")
    if not base_url or not api_key:
        sys.exit("Set MEMORY_BASE_URL and MEMORY_API_KEY.")
    client = MemoryClient(base_url, api_key, agent_id=os.environ.get("MEMORY_AGENT_ID") or "mcp")
    server = build_server(client)
    try:
        if args.transport == "stdio":
            server.run("stdio")
        else:
            server.run("streamable-http", host=args.host, port=args.port)
    finally:
        client.close()


if __name__ == "__main__":
    main()
