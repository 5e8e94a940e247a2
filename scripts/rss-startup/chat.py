#!/usr/bin/env python3
"""chat.py PORT N: N chats in one session over the server's /ws (a first one that makes the
session, then its followers), each read up to its `done`. For order.sh: the code a first
task runs. Standard library only (a minimal WebSocket client: text frames, masked)."""
import base64, json, os, socket, struct, sys


def send(sock, obj):
    data = json.dumps(obj).encode()
    mask = os.urandom(4)
    n = len(data)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def read_exact(f, n):
    out = f.read(n)
    if len(out) != n:
        raise SystemExit("connection closed")
    return out


def recv(f):
    while True:
        b0, b1 = read_exact(f, 2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", read_exact(f, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", read_exact(f, 8))[0]
        data = read_exact(f, n)
        if b0 & 0x0F == 1:
            return json.loads(data)
        if b0 & 0x0F == 8:
            raise SystemExit("closed by the server")


def main():
    port, chats = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    f = sock.makefile("rb")
    status = f.readline()
    if b" 101 " not in status:
        raise SystemExit(f"no upgrade: {status!r}")
    while f.readline() not in (b"\r\n", b""):
        pass
    session = None
    for i in range(chats):
        msg = {"type": "chat", "message": f"hello {i}"}
        if session:
            msg["session_id"] = session
        send(sock, msg)
        task = None
        while True:
            v = recv(f)
            if v.get("type") == "session_created":
                session = v.get("session_id")
            elif v.get("type") == "task_created":
                task = v.get("task_id")
            elif v.get("type") == "done" and v.get("task_id") == task:
                print(v.get("metadata", {}).get("status"))
                break
    sock.close()


main()
