/*
 * cli_kv.c - the --kv-method / --kv-budget / --kv-profile flags.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "entrokv/compress.h"
#include "entrokv/kvrecall.h"

void cli_kv_defaults(cli_kv_opts *o)
{
    o->method = "full";
    o->budget = 1.0;
    o->profile = NULL;
    o->decode = "none";
    o->scope_recent = 256; /* the SCOPE repository's R (specs/scope.md section 5) */
    o->scope_window = 512; /* and its smaller W */
    o->spark_ratio = 0.0;
    o->spark_recovery = "avg";
    o->recall_promote = 1;
    o->recall_channels = -1;
    o->recall_gather = KV_RECALL_GATHER_DEFAULT;
}

int32_t cli_kv_channels(const cli_kv_opts *o)
{
    return o->recall_channels < 0 ? 0 : o->recall_channels == 0 ? KVC_RECALL_BOX
                                                                 : o->recall_channels;
}

int cli_kv_take(int argc, char **argv, int *i, cli_kv_opts *o)
{
    const char *a = argv[*i];
    if (!strcmp(a, "--kv-method"))
        return cli_take_str(argc, argv, i, &o->method) ? 1 : -1;
    if (!strcmp(a, "--kv-profile"))
        return cli_take_str(argc, argv, i, &o->profile) ? 1 : -1;
    if (!strcmp(a, "--decode-method"))
        return cli_take_str(argc, argv, i, &o->decode) ? 1 : -1;
    if (!strcmp(a, "--scope-recent"))
        return cli_take_int(argc, argv, i, 1, 1 << 24, &o->scope_recent) ? 1 : -1;
    if (!strcmp(a, "--scope-window"))
        return cli_take_int(argc, argv, i, 2, 1 << 24, &o->scope_window) ? 1 : -1;
    if (!strcmp(a, "--recall"))
        return cli_take_int(argc, argv, i, 0, KVC_RECALL_MAX, &o->recall) ? 1 : -1;
    if (!strcmp(a, "--recall-every"))
        return cli_take_int(argc, argv, i, 1, KV_RECALL_EVERY_MAX, &o->recall_every) ? 1 : -1;
    if (!strcmp(a, "--recall-channels"))
        return cli_take_int(argc, argv, i, 0, KV_RECALL_CHANNELS_MAX, &o->recall_channels) ? 1
                                                                                           : -1;
    if (!strcmp(a, "--recall-gather"))
        return cli_take_int(argc, argv, i, 0, KV_RECALL_GATHER_MAX, &o->recall_gather) ? 1 : -1;
    if (!strcmp(a, "--recall-promote"))
        return cli_take_int(argc, argv, i, 0, 1, &o->recall_promote) ? 1 : -1;
    if (!strcmp(a, "--spark-recovery"))
        return cli_take_str(argc, argv, i, &o->spark_recovery) ? 1 : -1;
    if (!strcmp(a, "--spark-ratio")) {
        float r;
        if (!cli_take_float(argc, argv, i, 0.0, 0.99, &r))
            return -1;
        o->spark_ratio = r;
        return 1;
    }
    if (!strcmp(a, "--kv-budget")) {
        const char *v;
        if (!cli_take_str(argc, argv, i, &v))
            return -1;
        char *end;
        errno = 0;
        o->budget = strtod(v, &end);
        if (errno || end == v || *end) {
            cli_error("flags", "--kv-budget: '%s' is not a number", v);
            return -1;
        }
        return 1;
    }
    return 0;
}

/* profiles/<model file name>.uncomp in the source tree. */
static void default_profile(const char *model_path, char *out, size_t cap)
{
    const char *base = strrchr(model_path, '/');
    base = base ? base + 1 : model_path;
    size_t n = strlen(base);
    if (n > 5 && !strcmp(base + n - 5, ".gguf"))
        n -= 5;
    snprintf(out, cap, "%s/profiles/%.*s.uncomp", EKV_SOURCE_DIR, (int)n, base);
}

int cli_kv_policy(const char *cmd, const cli_kv_opts *o, const struct ekv_model *m,
                  const char *model_path, kvc_policy *policy, kvc_profile **profile)
{
    ekv_error err = {0};
    *profile = NULL;
    if (kvc_policy_parse(o->method, o->budget, policy, &err) ||
        kvc_decode_parse(o->decode, o->scope_recent, o->scope_window, &policy->decode, &err) ||
        kvc_spark_parse(o->spark_ratio, o->spark_recovery, &policy->spark, &err)) {
        cli_error(cmd, "%s", err.msg);
        return CLI_USAGE;
    }
    policy->recall = o->recall;
    policy->recall_every = o->recall_every;
    policy->recall_no_promote = !o->recall_promote;
    policy->recall_channels = cli_kv_channels(o);
    policy->recall_gather = o->recall_gather;
    if (policy->method != KVC_UNCOMP || (o->profile && !strcmp(o->profile, "none")))
        return CLI_OK;
    char path[4096];
    if (o->profile) {
        snprintf(path, sizeof path, "%s", o->profile);
    } else {
        default_profile(model_path, path, sizeof path);
        if (access(path, R_OK) != 0) {
            fprintf(stderr,
                    "entrokv %s: warning: no UNComp profile at %s; using online entropy "
                    "(make one with entrokv calibrate)\n",
                    cmd, path);
            return CLI_OK;
        }
    }
    *profile = kvc_profile_load(path, m, &err);
    if (!*profile) {
        cli_error(cmd, "%s", err.msg);
        return err.code == EKV_EIO ? CLI_FAIL : CLI_USAGE;
    }
    policy->profile = *profile;
    return CLI_OK;
}
