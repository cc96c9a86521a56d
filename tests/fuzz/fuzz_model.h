/*
 * fuzz_model.h - the demo model's tokenizer for the fuzz targets that need
 * one: EKV_MODEL, else the path tests/CMakeLists.txt compiles in as
 * EKV_MODEL_DEFAULT. Exits with a message when it cannot be loaded (a fuzz
 * target without its input has nothing to do).
 */
#ifndef EKV_FUZZ_MODEL_H
#define EKV_FUZZ_MODEL_H

#include <stdio.h>
#include <stdlib.h>

#include "entrokv/gguf.h"
#include "entrokv/status.h"
#include "entrokv/tokenizer.h"

static ekv_tokenizer *fuzz_load_tokenizer(const char *who)
{
    const char *path = getenv("EKV_MODEL");
#ifdef EKV_MODEL_DEFAULT
    if (!path || !*path)
        path = EKV_MODEL_DEFAULT;
#endif
    ekv_error err = {0};
    gguf_file *f = path ? gguf_open(path, &err) : NULL;
    ekv_tokenizer *tok = f ? tok_load(f, &err) : NULL;
    gguf_close(f);
    if (!tok) {
        fprintf(stderr, "%s: cannot load the tokenizer of %s: %s "
                "(scripts/setup.sh fetches the demo model; EKV_MODEL overrides)\n",
                who, path ? path : "(no model)", err.msg);
        exit(1);
    }
    return tok;
}

#endif
