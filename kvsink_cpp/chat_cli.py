"""The interactive chat loop behind `python -m kvsink_cpp chat`: streams each
reply, keeps the conversation (later turns evaluate only their new tokens),
drops the oldest turns when the context would overflow, and survives Ctrl-C."""
from __future__ import annotations

import sys
from typing import List, Optional

from .llama import Llama

HELP = ("commands: /reset (new conversation), /stats (speed of the last reply and the settings), /exit; "
        "Ctrl-C stops a reply")


class ChatSession:
    def __init__(self, llm: Llama, system: Optional[str], sampling: dict, max_tokens: Optional[int],
                 out=sys.stdout):
        self.llm = llm
        self.system = system
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.out = out
        self.messages: List[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def stats(self) -> str:
        t = self.llm.last_timings
        settings = f"settings: {self.llm.describe_settings()}"
        if not t:
            return f"no reply yet\n{settings}"
        pp = t["prompt_tokens"] / t["prompt_seconds"] if t["prompt_seconds"] else 0.0
        tg = (t["generated_tokens"] - 1) / t["generation_seconds"] if t["generation_seconds"] else 0.0
        return (f"prompt: {t['prompt_tokens']} tokens, {pp:.1f} tokens/s; "
                f"generation: {t['generated_tokens']} tokens, {tg:.1f} tokens/s; "
                f"context: {self.llm.n_tokens}/{self.llm.n_ctx()} tokens\n{settings}")

    def _fit_context(self) -> None:
        """Drop the oldest exchanges (never the system prompt or the new message)
        until the prompt leaves room for a reply."""
        reserve = min(self.max_tokens or 256, self.llm.n_ctx() // 4)
        while True:
            prompt = self.llm.chat_formatter().render(self.messages, add_generation_prompt=True)
            n = len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
            first = 1 if self.system else 0
            if n + reserve <= self.llm.n_ctx():
                return
            if len(self.messages) - first <= 1:
                # the new message alone leaves no room for a reply: say so
                # rather than let the cache keep only its tail
                del self.messages[-1]
                raise ValueError(f"this message makes a prompt of {n} tokens; with {reserve} kept for the reply "
                                 f"the context of {self.llm.n_ctx()} has no room for it: shorten it or start "
                                 f"chat with a larger -c")
            del self.messages[first]

    def reply(self, text: str) -> str:
        """Stream the assistant's answer to `text`; Ctrl-C keeps what was said so far."""
        self.messages.append({"role": "user", "content": text})
        self._fit_context()
        pieces: List[str] = []
        stream = self.llm.create_chat_completion(self.messages, stream=True, max_tokens=self.max_tokens,
                                                 **self.sampling)
        try:
            for chunk in stream:
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run_chat(llm: Llama, system: Optional[str], sampling: dict, max_tokens: Optional[int]) -> int:
    session = ChatSession(llm, system, sampling, max_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)", file=sys.stderr)
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command == "/stats":
            print(session.stats(), file=sys.stderr)
            continue
        if command == "/help":
            print(HELP, file=sys.stderr)
            continue
        try:
            session.reply(line)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
