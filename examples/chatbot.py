#!/usr/bin/env python3
"""A tiny text chatbot that talks through a running avatar-agent.

Rule-based replies (no network, no model): type a line, the bot answers, and the avatar speaks the
answer with lip-sync.  Commands: ``/stop`` interrupts, ``/mood NAME [0..1]`` sets the emotion,
``/quit`` leaves.  See examples/README.md.

    python examples/chatbot.py --url http://127.0.0.1:8080 [--token T] [--script lines.txt]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, TextIO

from avatar_agent.client import ApiError, AvatarClient

RULES: list[tuple[str, list[str], str | None]] = [
    (r"\b(hi|hello|hey|good (morning|afternoon|evening))\b",
     ["Hello! Nice to meet you.", "Hi there! What shall we talk about?"], "happiness"),
    (r"\bhow are you\b", ["I am doing great, thank you for asking!"], "happiness"),
    (r"\b(your name|who are you)\b",
     ["I am a talking avatar. My face is drawn in real time from a single photo."], "neutral"),
    (r"\b(sad|unhappy|bad day|tired)\b",
     ["I am sorry to hear that. I hope things get better soon."], "sadness"),
    (r"\b(wow|amazing|really)\b", ["Really? That is surprising!"], "surprise"),
    (r"\b(joke|funny)\b",
     ["Why did the avatar cross the screen? To get to the other frame."], "happiness"),
    (r"\b(bye|goodbye|see you)\b", ["Goodbye! It was nice talking to you."], "neutral"),
    (r"\?$", ["That is a good question. Let me think about it.",
              "I am not sure, but it is fun to wonder."], "neutral"),
]
FALLBACK = ["Tell me more.", "I see. Please go on.", "Interesting!"]


def reply(text: str, rng: random.Random) -> tuple[str, str | None]:
    """The bot's answer and the emotion to show while saying it."""
    t = text.strip().lower()
    for pattern, answers, emotion in RULES:
        if re.search(pattern, t):
            return rng.choice(answers), emotion
    return rng.choice(FALLBACK), None


@dataclass
class SpeechWatcher:
    """Follows the agent's events in a thread, so the bot can wait for an utterance to end."""

    client: AvatarClient
    finished: dict[int, dict] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    error: Exception | None = None

    def start(self) -> None:
        """Read the agent's events on a background thread."""
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for ev in self.client.events(types=["speech_finished"], timeout=60):
                with self.cond:
                    self.finished[int(ev.data["utterance"])] = ev.data
                    self.cond.notify_all()
        except Exception as e:  # the agent went away: stop waiting for events
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def wait(self, uid: int, timeout: float = 60.0) -> dict | None:
        """Block until utterance ``uid`` finished (None on timeout or a lost connection)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while uid not in self.finished and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.finished.get(uid)


def chat(client: AvatarClient, lines: Iterable[str], out: TextIO, wait: bool = True,
         seed: int = 0) -> int:
    """Run the conversation over ``lines``; returns how many replies were spoken."""
    rng = random.Random(seed)
    watcher = SpeechWatcher(client)
    if wait:
        watcher.start()
        time.sleep(0.2)                      # let the event stream connect first
    spoken = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/stop":
            print(f"[interrupted: {client.interrupt()}]", file=out)
            continue
        if line.startswith("/mood"):
            parts = line.split()
            try:
                client.set_emotion(parts[1], float(parts[2]) if len(parts) > 2 else None)
                print(f"[mood: {parts[1]}]", file=out)
            except (IndexError, ValueError, ApiError) as e:
                print(f"[mood: {e}]", file=out)
            continue
        answer, emotion = reply(line, rng)
        print(f"bot: {answer}", file=out, flush=True)
        try:
            uid = client.say(answer, emotion=emotion)
        except ApiError as e:
            print(f"[the avatar could not speak: {e}]", file=out)
            continue
        spoken += 1
        if wait:
            done = watcher.wait(uid)
            if done is not None and done.get("interrupted"):
                print("[cut short]", file=out)
    return spoken


def main(argv: list[str] | None = None) -> int:
    """Run the chatbot; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the agent's server")
    ap.add_argument("--token", default=None, help="server.token, if the agent requires one")
    ap.add_argument("--script", default=None, help="read user lines from this file (else stdin)")
    ap.add_argument("--no-wait", action="store_true",
                    help="do not wait for each reply to be spoken before reading the next line")
    args = ap.parse_args(argv)
    client = AvatarClient(args.url, token=args.token)
    try:
        client.status()
    except (ApiError, OSError) as e:
        print(f"cannot reach the agent at {args.url}: {e}\n"
              "start it with: avatar-agent start --set audio.source=tts", file=sys.stderr)
        return 1
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            lines = f.readlines()
    else:
        print("Say something to the avatar (/stop, /mood happiness 0.8, /quit).", flush=True)
        lines = iter(lambda: (print("you: ", end="", flush=True), sys.stdin.readline())[1], "")
    chat(client, lines, sys.stdout, wait=not args.no_wait)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
