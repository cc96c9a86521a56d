/*
 * proto_strings.c - see proto_strings.h. The wire format: each field is a
 * varint key (number << 3 | wire type) then a varint (type 0), 8 bytes
 * (1), a varint length and that many bytes (2: strings, bytes, messages,
 * packed arrays) or 4 bytes (5). Groups (3, 4) are not used by proto3.
 */
#include "proto_strings.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "entrokv/coordinator.h"

/* Nested messages deeper than this are refused (protobuf-c itself does
 * not limit the depth; ours are at most three deep). */
#define MAX_DEPTH 32

static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (unsigned shift = 0; shift < 64 && *p < end; shift += 7) {
        const uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;
}

__attribute__((format(printf, 3, 4))) static bool refuse(char *why, size_t n, const char *fmt,
                                                         ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, n, fmt, ap);
    va_end(ap);
    return false;
}

static bool walk(const ProtobufCMessageDescriptor *desc, const uint8_t *p, const uint8_t *end,
                 int depth, char *why, size_t why_len)
{
    if (depth > MAX_DEPTH)
        return refuse(why, why_len, "messages nested deeper than %d", MAX_DEPTH);
    while (p < end) {
        uint64_t key, v;
        if (!read_varint(&p, end, &key))
            return refuse(why, why_len, "a field key is cut short");
        switch (key & 7) {
        case 0:
            if (!read_varint(&p, end, &v))
                return refuse(why, why_len, "a varint is cut short");
            break;
        case 1:
        case 5: {
            const size_t w = (key & 7) == 1 ? 8 : 4;
            if ((size_t)(end - p) < w)
                return refuse(why, why_len, "a fixed-width field is cut short");
            p += w;
            break;
        }
        case 2: {
            if (!read_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return refuse(why, why_len, "a length-delimited field is cut short");
            const ProtobufCFieldDescriptor *f =
                key >> 3 <= UINT32_MAX
                    ? protobuf_c_message_descriptor_get_field(desc, (unsigned)(key >> 3))
                    : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_STRING) {
                if (memchr(p, 0, (size_t)v))
                    return refuse(why, why_len, "field '%s' contains a NUL byte", f->name);
                if (!coord_utf8_valid((const char *)p, (size_t)v))
                    return refuse(why, why_len, "field '%s' is not valid UTF-8", f->name);
            } else if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                       !walk(f->descriptor, p, p + v, depth + 1, why, why_len)) {
                return false;
            }
            p += v;
            break;
        }
        default:
            return refuse(why, why_len, "wire type %u is not proto3", (unsigned)(key & 7));
        }
    }
    return true;
}

bool proto_strings_valid(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len,
                         char *why, size_t why_len)
{
    if (why_len)
        why[0] = '\0';
    return walk(desc, data, data + len, 0, why, why_len);
}
