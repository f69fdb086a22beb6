"""`ncp chat [--model NAME] [-p PROMPT]`: talk to the served model in the terminal.

Interactive by default (streamed answers, a multi-turn history, `/clear` starts over, `/exit` or
Ctrl-D quits), one answer with `-p`, like nanochat's chat CLI. It talks to the OpenAI-compatible
endpoint the API relays to the inference service (`$NCP_API_URL/v1`, with NCP_API_TOKEN), so a
remote platform works like a local one; `--url` points it at any OpenAI-compatible server instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from services.api.client import parse_sse

HELP = "/clear starts a new conversation, /exit (or Ctrl-D) quits"


class ChatError(RuntimeError):
    pass


class ChatSession:
    """A conversation with one model of an OpenAI-compatible server."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        model: str | None,
        *,
        system: str | None = None,
        temperature: float = 0.6,
        top_k: int | None = 50,
        max_tokens: int = 256,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(10.0, read=None)
        )
        self.system, self.temperature, self.top_k, self.max_tokens = system, temperature, top_k, max_tokens
        self.history: list[dict[str, str]] = []
        self.model = model or self.served_model()

    def close(self) -> None:
        self.http.close()

    def _error(self, r: httpx.Response) -> ChatError:
        try:
            err = r.json().get("error", {})
            message = err.get("message") or r.text[:300]
        except ValueError:
            message = r.text[:300]
        return ChatError(f"HTTP {r.status_code}: {message}")

    def served_model(self) -> str:
        try:
            r = self.http.get("/v1/models")
        except httpx.TransportError as e:
            raise ChatError(f"cannot reach {self.base_url}: {e}") from None
        if r.status_code != 200:
            raise self._error(r)
        models = r.json().get("data") or []
        if not models:
            raise ChatError(f"{self.base_url} serves no model yet (run a pipeline job with a serve stage)")
        return str(models[0]["id"])

    def clear(self) -> None:
        self.history = []

    def ask(self, text: str) -> Iterator[str]:
        """Send `text` with the conversation so far; yields the answer as it streams in and keeps
        both turns in the history."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*messages, {"role": "user", "content": text}],
            "stream": True,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.top_k:
            body["top_k"] = self.top_k
        answer: list[str] = []
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise self._error(r)
                for ev in parse_sse(r.iter_lines()):
                    if ev.data == "[DONE]":
                        break
                    for choice in json.loads(ev.data).get("choices", []):
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            answer.append(delta)
                            yield delta
        except httpx.TransportError as e:
            raise ChatError(f"the answer stream from {self.base_url} broke: {e}") from None
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]


def _print_answer(session: ChatSession, text: str, out: Any) -> None:
    for delta in session.ask(text):
        out.write(delta)
        out.flush()
    out.write("\n")


def interactive(session: ChatSession, out: Any = None, read: Any = input) -> None:
    out = out or sys.stdout
    print(f"chatting with {session.model} at {session.base_url}; {HELP}", file=out)
    while True:
        try:
            text = read("\nyou> ").strip()
        except EOFError:
            print(file=out)
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            session.clear()
            print("(new conversation)", file=out)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text}; {HELP})", file=out)
            continue
        out.write(f"{session.model}> ")
        _print_answer(session, text, out)


def run(args: argparse.Namespace) -> int:
    from shared.settings import get_settings

    s = get_settings()
    url = args.url or s.api_url or ""
    token = s.api_token if not args.url else None
    try:
        session = ChatSession(
            url, token, args.model, system=args.system, temperature=args.temperature,
            top_k=args.top_k, max_tokens=args.max_tokens,
        )  # fmt: skip
    except ChatError as e:
        print(f"ncp chat: {e}", file=sys.stderr)
        return 1
    try:
        if args.prompt is not None:
            _print_answer(session, args.prompt, sys.stdout)
        else:
            interactive(session)
        return 0
    except ChatError as e:
        print(f"\nncp chat: {e}", file=sys.stderr)
        return 1
    finally:
        session.close()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="chat with the served model (streamed; -p for one answer)")
    p.add_argument("--model", help="served model name (default: the one the server serves)")
    p.add_argument("-p", "--prompt", help="ask this once, print the answer and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50, help="0 turns top-k sampling off")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument(
        "--url",
        help="an OpenAI-compatible server to use directly (default: the API's /v1 relay, NCP_API_URL)",
    )
    p.set_defaults(func=run)
