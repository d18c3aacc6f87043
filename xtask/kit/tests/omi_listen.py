#!/usr/bin/env python3
"""An Omi `listen` session against a pusher, written from ../shared/omi-pusher.md alone.

Plays, with audio_timeline=2 and 1 s frames of seeded PCM sent as fast as the socket takes them:
conversation A, a switch to conversation B (103), a heartbeat (100) every 20 s of capture, one
transcript (102), then the connection breaks without a close frame; listen reconnects and resends
the last 3 s before the break (version 2: the same timestamps), goes on to the end, asks for
B to be processed (104), waits for its 201 and closes (1000). Checks every reply, then writes to
OUT what the pusher should have stored: OUT/<conversation>.pcm (the conversation's audio, in
order, each sample once) and OUT/expected.json (uid, sample_rate, and each chunk: conversation,
key without the .bin/.enc ending, v2_start, samples, in key order). Exits non-zero on any surprise.

    omi_listen.py ws://127.0.0.1:PORT --uid U --rate 16000 --seed 7 --seconds 45 \\
        --chunk-seconds 2 --out DIR

The contract's chunks are 60 s; a test pusher may cut shorter (--chunk-seconds). A version-2
pusher ignores replays and trims overlaps, also of audio an earlier connection delivered, so the
resent seconds are not stored again: the capture goes on from the break, in chunks that start
there. Nothing of the capture lost, nothing twice.
"""

import argparse
import asyncio
import json
import random
import struct
import uuid
from pathlib import Path

from websockets.asyncio.client import connect

# The capture's first sample (Unix seconds): 373/512 after the second, exact in binary, and its
# key rounds it (…845.729, not …845.728).
T0 = 1786961845.728515625
ACK = {"type": "audio_timeline_ack", "version": 2}


def frame(op, payload=b""):
    return struct.pack("<I", op) + payload


class Session:
    def __init__(self, a):
        self.a, self.rate = a, a.rate
        rng = random.Random(a.seed)
        self.pcm = rng.randbytes(a.seconds * a.rate * 2)
        self.convs = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in "AB"]
        base = a.url.replace("http", "ws", 1).rstrip("/")
        self.url = f"{base}/v1/trigger/listen?uid={a.uid}&sample_rate={a.rate}&client_kind=python&audio_timeline=2"
        self.runs = []  # (conversation, first second, end second) of each run sent

    def second(self, i):
        return self.pcm[i * self.rate * 2 : (i + 1) * self.rate * 2]

    async def open(self, conversation):
        ws = await connect(self.url, max_size=None, open_timeout=10)
        reply = await asyncio.wait_for(ws.recv(), 4)  # listen waits 4 s for the ack
        op, body = struct.unpack("<I", reply[:4])[0], json.loads(reply[4:])
        assert (op, body) == (202, ACK), f"want the v2 ack, got {op} {body}"
        await ws.send(frame(103, conversation.encode()))
        return ws

    async def play(self, ws, conversation, start, end, stored_from=None):
        """Sends seconds [start, end) of the capture, stamped with their capture time; the
        pusher stores [stored_from, end) of them (the rest it already has)."""
        for i in range(start, end):
            await ws.send(frame(101, struct.pack("<d", T0 + i) + self.second(i)))
            if i % 20 == 19:
                await ws.send(frame(100))
        self.runs.append((conversation, start if stored_from is None else stored_from, end))

    async def run(self):
        n, c = self.a.seconds, self.a.chunk_seconds
        a, b = self.convs
        switch = c * (n // (3 * c)) + 1  # A ends 1 s into a chunk: cut by the 103
        brk = switch + c * ((n * 3 // 5 - switch) // c) + 1  # the break: 1 s into a chunk of B
        resend = brk - 3  # 3 s before the break, from the middle of a chunk
        assert 0 < switch < resend < brk < n, "too short a capture for this session"
        ws = await self.open(a)
        await self.play(ws, a, 0, switch)
        await ws.send(frame(103, b.encode()))
        await ws.send(frame(102, json.dumps({"segments": [], "memory_id": b}).encode()))
        await self.play(ws, b, switch, brk)
        # The pusher read everything before the break (its pong follows the frames it read):
        # so it is known which seconds it holds, and the resend repeats them.
        await asyncio.wait_for(await ws.ping(), 30)
        ws.transport.abort()  # no close frame: the connection just breaks
        await ws.wait_closed()
        await asyncio.sleep(1)  # listen's reconnect backoff
        ws = await self.open(b)
        await self.play(ws, b, resend, n, stored_from=brk)
        await ws.send(frame(104, json.dumps({"conversation_id": b, "language": "en"}).encode()))
        reply = await asyncio.wait_for(ws.recv(), 30)
        op, body = struct.unpack("<I", reply[:4])[0], json.loads(reply[4:])
        assert (op, body) == (201, {"conversation_id": b, "success": True}), f"104 got {op} {body}"
        await ws.close()
        assert ws.close_code == 1000, f"want close 1000, got {ws.close_code}"

    def expected(self):
        """The store after the session: per run, chunks from its first frame, cut every
        chunk-seconds and at the run's end; a key sent again keeps its longest piece."""
        store = {}
        for conv, start, end in self.runs:
            for s in range(start, end, self.a.chunk_seconds):
                key = f"chunks/{self.a.uid}/{conv}/{T0 + s:.3f}.batch"
                body = b"".join(self.second(i) for i in range(s, min(end, s + self.a.chunk_seconds)))
                old = store.get(key, (conv, s, b""))[2]
                assert body.startswith(old) or old.startswith(body), f"{key}: two audios"
                store[key] = (conv, s, max(old, body, key=len))
        chunks, pcm = [], {conv: b"" for conv in self.convs}
        for key in sorted(store):
            conv, s, body = store[key]
            assert len(pcm[conv]) == (s - min(r[1] for r in self.runs if r[0] == conv)) * self.rate * 2
            pcm[conv] += body
            chunks.append({"conversation": conv, "key": key, "v2_start": repr(T0 + s), "samples": len(body) // 2})
        return chunks, pcm


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="the pusher's base URL, ws:// (or http://, as listen takes it)")
    p.add_argument("--uid", required=True)
    p.add_argument("--rate", type=int, choices=[8000, 16000], default=16000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seconds", type=int, default=45, help="seconds of capture")
    p.add_argument("--chunk-seconds", type=int, default=60, help="the pusher's chunk length")
    p.add_argument("--out", type=Path, required=True, help="a directory for the expectations")
    a = p.parse_args()
    s = Session(a)
    asyncio.run(s.run())
    chunks, pcm = s.expected()
    a.out.mkdir(parents=True, exist_ok=True)
    for conv, audio in pcm.items():
        (a.out / f"{conv}.pcm").write_bytes(audio)
    doc = {"uid": a.uid, "sample_rate": a.rate, "conversations": s.convs, "chunks": chunks}
    (a.out / "expected.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
