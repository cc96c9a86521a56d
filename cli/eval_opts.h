/*
 * eval_opts.h - the options of `entrokv eval` shared by its tasks
 * (cmd_eval.c parses them, eval_tasks.c runs them).
 */
#ifndef ENTROKV_CLI_EVAL_OPTS_H
#define ENTROKV_CLI_EVAL_OPTS_H

#include <stdint.h>

#include "cli.h"
#include "entrokv/compress.h"
#include "eval.h"

#define EVAL_MAX_LIST 16

typedef struct eval_opts {
    const char *model, *text, *filler, *out_dir;
    const char *text_now;                /* ppl/longgen: the file of this run (JSON "text") */
    int32_t prefix, cont, windows;       /* ppl */
    int32_t context, trials;             /* passkey */
    double depths[EVAL_MAX_LIST];
    int n_depths;
    uint64_t seed;
    const char *methods[EVAL_MAX_LIST];  /* streaming, snapkv, ..., uncomp-online */
    int n_methods;
    double budgets[EVAL_MAX_LIST];
    int n_budgets;
    int32_t threads;
    const char *device;                  /* --device cpu | cuda (NULL: cpu) */
    cli_kv_opts kv;
    /* resolved */
    kvc_profile *profile;
    int profile_loaded, uncomp_is_online;
} eval_opts;

int eval_build_policies(eval_opts *o, const ekv_model *m, eval_policy *pols, int *n_pols);
/* Each adds into sum/acc per policy (ppl: ratio to full, averaged over windows;
 * passkey: correct answers and mean bytes) and prints JSON lines if print. */
int eval_run_ppl(eval_opts *o, ekv_runtime *rt, const int32_t *tokens, int32_t n_tokens,
                 const eval_policy *pols, int n_pols, eval_metrics *sum, int print);
int eval_run_passkey(eval_opts *o, ekv_runtime *rt, const int32_t *filler, int32_t n_filler,
                     const eval_policy *pols, int n_pols, eval_metrics *acc, int print);

#endif
