#!/usr/bin/env python3
"""make_kvwire_seeds.py - writes the seed corpus for fuzz_kvwire.c.

Each seed is one byte (how many of the following bytes form the header)
followed by a 64-byte KV store wire header and its data, one per message
kind, plus a bad magic and a truncated header. Usage:
    python3 tests/fuzz/make_kvwire_seeds.py tests/fuzz/corpus/kvwire
"""
import struct, os, sys
out = sys.argv[1]
def hdr(op, flags=0, rid=1, key=bytes(range(32)), plen=0, status=0, csum=0):
    return struct.pack('<IBBHQ32sIHHQ', 0x53564b45, 1, op, flags, rid, key, plen, status, 0, csum)
seeds = {
  'challenge': hdr(1, plen=32) + bytes(range(100, 132)),
  'auth': hdr(2, plen=64) + bytes(64),
  'auth_ok': hdr(3, plen=32) + bytes(32),
  'put_4160': hdr(4, plen=4160, csum=0x1234) + bytes(4160),
  'put_reply_nospace': hdr(4, flags=1, status=3),
  'get': hdr(5),
  'get_reply_hit': hdr(5, flags=1, plen=100, csum=99) + bytes(100),
  'get_reply_miss': hdr(5, flags=1, status=1),
  'exists': hdr(6),
  'del_reply': hdr(7, flags=1, status=0),
  'bad_magic': b'XXXX' + hdr(5)[4:],
  'truncated': hdr(5)[:40],
}
for name, body in seeds.items():
    hl = min(len(body), 64) if name != 'truncated' else 40
    with open(os.path.join(out, name), 'wb') as f:
        f.write(bytes([hl]) + body)
