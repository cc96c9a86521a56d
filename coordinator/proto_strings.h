/*
 * proto_strings.h - the string fields of a serialized protobuf message,
 * checked on the wire.
 *
 * protobuf-c hands a string field back NUL-terminated with no length, so a
 * NUL inside one would silently cut it (a prompt would lose its tail), and
 * it does not check that strings are UTF-8, which proto3 requires. The
 * check walks the bytes with the message's descriptor, nested messages
 * included, and refuses both: the front ends answer INVALID_ARGUMENT with
 * the field's name, as the HTTP API answers 400 for the same input.
 */
#ifndef ENTROKV_COORDINATOR_PROTO_STRINGS_H
#define ENTROKV_COORDINATOR_PROTO_STRINGS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* True when every string field in data[0, len) (a message of type desc)
 * is UTF-8 without NUL; otherwise false, with the reason in why, e.g.
 * "field 'content' contains a NUL byte". Unknown fields are not looked
 * into. Meant for bytes that protobuf_c_message_unpack accepted. */
bool proto_strings_valid(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len,
                         char *why, size_t why_len);

#endif
