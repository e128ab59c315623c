"""A tiny DNS server: every A question for `who.lab` gets ANSWER, TTL 0.

Enough DNS for the example (RFC 1035 section 4): it reads one question and
answers it; any other name gets NXDOMAIN. Python's standard library only.
"""

import os
import socket
import struct

NAME = b"\x03who\x03lab\x00"
ANSWER = socket.inet_aton(os.environ["ANSWER"])

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
while True:
    query, peer = sock.recvfrom(512)
    if len(query) < 12:
        continue
    (ident,) = struct.unpack("!H", query[:2])
    end = query.index(b"\x00", 12) + 5  # the name, then QTYPE and QCLASS
    question = query[12:end]
    qtype = struct.unpack("!H", question[-4:-2])[0]
    found = question[:-4].lower() == NAME
    answers = 1 if found and qtype == 1 else 0
    # QR, opcode 0, AA, RD copied; RCODE 3 (NXDOMAIN) for another name.
    flags = 0x8400 | (struct.unpack("!H", query[2:4])[0] & 0x0100) | (0 if found else 3)
    reply = struct.pack("!HHHHHH", ident, flags, 1, answers, 0, 0) + question
    if answers:
        # A pointer to the question's name (offset 12), type A, class IN, TTL 0.
        reply += struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + ANSWER
    sock.sendto(reply, peer)
