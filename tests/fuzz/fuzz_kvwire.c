/*
 * fuzz_kvwire.c - libFuzzer target for the KV store wire header decoder.
 *
 * The first input byte chooses how many of the rest form the header (so
 * short, exact and long headers are all explored); the remainder stands
 * for the message's data. Whatever decodes must re-encode to the same 64
 * bytes, respect the per-op length rules (checked again here,
 * independently), and agree with kvwire_check_payload about the data.
 *
 * Run with scripts/fuzz.sh; seeds live in tests/fuzz/corpus/kvwire/.
 */
#include "entrokv/kvwire.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t hlen = data[0];
    data++, size--;
    if (hlen > size)
        hlen = size;
    /* a heap copy of exactly hlen bytes: ASan catches any read past it */
    uint8_t *hdr = malloc(hlen ? hlen : 1);
    memcpy(hdr, data, hlen);
    kvwire_hdr h;
    ekv_error err;
    ekv_status st = kvwire_decode(hdr, hlen, &h, &err);
    if (st == EKV_OK) {
        if (hlen != KVWIRE_HEADER_BYTES)
            abort();
        uint8_t again[KVWIRE_HEADER_BYTES];
        kvwire_encode(&h, again);
        if (memcmp(again, hdr, KVWIRE_HEADER_BYTES) != 0)
            abort(); /* decode accepted bytes it does not reproduce */
        if (h.payload_len > KVWIRE_MAX_PAYLOAD || h.op < 1 || h.op > KVWIRE_OP_MAX)
            abort();
        if (h.op <= KVWIRE_OP_AUTH_OK && (h.flags & KVWIRE_F_REPLY))
            abort();
        size_t rest = size - hlen;
        ekv_status pst = kvwire_check_payload(&h, rest, &err);
        if ((pst == EKV_OK) != (rest == h.payload_len))
            abort();
    } else if (st != EKV_EFORMAT || !err.msg[0]) {
        abort(); /* every rejection is a format error with a reason */
    }
    (void)kvwire_op_name(hlen ? hdr[hlen - 1] : 0);
    free(hdr);
    return 0;
}
