/*
 * kvrecall_store.h - the recall tier's backend (kvrecall_tier.h) over a KV
 * store client (kvstore.h): spilled recall blocks go to the client's
 * daemons under the client's namespace, each value with its checksum and
 * the namespace's MAC, verified on every get (a value that fails is a miss,
 * never used). Give it a client of its own with no host tier
 * (local_capacity 0): blocks are spilled because host memory is short, so
 * they should not be copied into it again.
 */
#ifndef ENTROKV_KVRECALL_STORE_H
#define ENTROKV_KVRECALL_STORE_H

#include "entrokv/kvrecall_tier.h"
#include "entrokv/kvstore.h"

/* The backend over c (borrowed: it must outlive every tier using it, and
 * be destroyed, which finishes its ops, before the tier is). */
void kvrecall_store_backend(kvstore_client *c, kv_recall_backend *out);

#endif
