/*
 * cmd_generate.c - `entrokv generate`: one prompt, streamed to stdout, or one
 * JSON object at the end with --json.
 */
#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "entrokv/comm.h"
#include "entrokv/generate.h"
#include "entrokv/grammar.h"
#include "entrokv/kvcache.h"
#include "entrokv/model.h"
#include "entrokv/tokenizer.h"
#ifdef EKV_HAVE_CUDA
#include "entrokv/model_cuda.h"
#endif

#define MAX_STOPS 16

static void usage(FILE *out)
{
    fprintf(out,
            "usage: entrokv generate --model PATH --prompt TEXT [flags]\n"
            "  --model PATH          GGUF model file\n"
            "  --prompt TEXT         the prompt\n"
            "  --chat                wrap the prompt as a user message in the model's chat template\n"
            "  --system TEXT         system message for --chat (default: the template's own)\n"
            "  --special             parse special tokens (e.g. <|im_start|>) in a raw prompt\n"
            "  --max-tokens N        tokens to generate (default 256)\n"
            "  --temperature T       0 = greedy (default 0)\n"
            "  --top-k K, --top-p P, --min-p P, --repeat-penalty R   sampling filters\n"
            "  --seed S              sampling seed (default 0)\n"
            "  --stop TEXT           stop string (repeatable, up to %d)\n"
            "  --ignore-eos          keep generating past end-of-generation tokens\n"
            "  --ctx N               context length (default: the model's)\n"
            "  --threads N           threads (default: one per core; with --tp, shared by the ranks)\n"
            "  --device cpu|cuda     where the forward runs (default cpu); cuda: GPU 0, full KV or\n"
            "                        prompt compression (docs/cuda.md)\n"
            "  --tp N                tensor parallelism: N ranks as threads of this process, each\n"
            "                        with its share of the heads and the MLP (docs/tp.md)\n"
            "  --json                print one JSON object at the end instead of streaming\n"
            "  --response-format J   structured output: OpenAI's response_format object as JSON,\n"
            "                        e.g. '{\"type\": \"json_object\"}' (docs/serving.md)\n"
            CLI_KV_USAGE,
            MAX_STOPS);
}

typedef struct gen_opts {
    const char *model, *prompt, *system, *response_format;
    const char *device; /* NULL or "cpu": the CPU forward; "cuda" */
    bool chat, special, json;
    int32_t ctx, threads, tp;
    const char *stops[MAX_STOPS];
    size_t n_stops;
    gen_params params;
    cli_kv_opts kv;
} gen_opts;

/* ---- --tp: ranks 1..N-1 as threads following rank 0 (generate.h) ---- */

typedef struct tp_rank {
    pthread_t th;
    comm_threads_group *g;
    int rank, threads;
    const ekv_model *m;
    int32_t ctx;
    const int32_t *ids;
    int32_t n_ids;
    const gen_params *params;
    ekv_status rc;
    ekv_error err;
} tp_rank;

static void *tp_follower(void *p)
{
    tp_rank *r = p;
    ekv_comm *comm = comm_open_thread(r->g, r->rank, &r->err);
    ekv_runtime *rt = comm ? model_runtime_create_tp(r->m, 512, r->ctx, r->threads, comm, &r->err)
                           : NULL;
    kv_pool *kv = rt ? model_kv_pool_create_shard(r->m, model_runtime_shard(rt), r->ctx, &r->err)
                     : NULL;
    if (!kv) {
        r->rc = r->err.code ? r->err.code : EKV_ENOMEM;
        comm_threads_group_abort(r->g); /* rank 0 must not wait for this rank */
    } else {
        r->rc = gen_follow(rt, kv, r->ids, r->n_ids, r->params, &r->err);
    }
    kv_pool_destroy(kv);
    model_runtime_free(rt);
    comm_free(comm);
    return NULL;
}

static int parse(int argc, char **argv, gen_opts *o)
{
    memset(o, 0, sizeof *o);
    gen_params_default(&o->params);
    o->params.sampling.temperature = 0.0f;
    cli_kv_defaults(&o->kv);
    ekv_sampler_params *sp = &o->params.sampling;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool ok = true;
        int kv;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return -1;
        } else if (!strcmp(a, "--model")) {
            ok = cli_take_str(argc, argv, &i, &o->model);
        } else if (!strcmp(a, "--prompt")) {
            ok = cli_take_str(argc, argv, &i, &o->prompt);
        } else if (!strcmp(a, "--system")) {
            ok = cli_take_str(argc, argv, &i, &o->system);
        } else if (!strcmp(a, "--chat")) {
            o->chat = true;
        } else if (!strcmp(a, "--special")) {
            o->special = true;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--response-format")) {
            ok = cli_take_str(argc, argv, &i, &o->response_format);
        } else if (!strcmp(a, "--ignore-eos")) {
            o->params.ignore_eos = true;
        } else if (!strcmp(a, "--max-tokens")) {
            ok = cli_take_int(argc, argv, &i, 0, 1 << 24, &o->params.max_tokens);
        } else if (!strcmp(a, "--temperature")) {
            ok = cli_take_float(argc, argv, &i, 0.0, 100.0, &sp->temperature);
        } else if (!strcmp(a, "--top-k")) {
            ok = cli_take_int(argc, argv, &i, 0, 1 << 24, &sp->top_k);
        } else if (!strcmp(a, "--top-p")) {
            ok = cli_take_float(argc, argv, &i, 1e-9, 1.0, &sp->top_p);
        } else if (!strcmp(a, "--min-p")) {
            ok = cli_take_float(argc, argv, &i, 0.0, 1.0, &sp->min_p);
        } else if (!strcmp(a, "--repeat-penalty")) {
            ok = cli_take_float(argc, argv, &i, 1e-3, 100.0, &sp->repeat_penalty);
        } else if (!strcmp(a, "--seed")) {
            ok = cli_take_u64(argc, argv, &i, &sp->seed);
        } else if (!strcmp(a, "--stop")) {
            if (o->n_stops == MAX_STOPS) {
                cli_error("generate", "at most %d --stop strings", MAX_STOPS);
                return CLI_USAGE;
            }
            ok = cli_take_str(argc, argv, &i, &o->stops[o->n_stops++]);
        } else if (!strcmp(a, "--ctx")) {
            ok = cli_take_int(argc, argv, &i, 16, 1 << 20, &o->ctx);
        } else if (!strcmp(a, "--threads")) {
            ok = cli_take_int(argc, argv, &i, 1, 1024, &o->threads);
        } else if (!strcmp(a, "--device")) {
            ok = cli_take_str(argc, argv, &i, &o->device);
            if (ok && strcmp(o->device, "cpu") && strcmp(o->device, "cuda")) {
                cli_error("generate", "--device: 'cpu' or 'cuda', not '%s'", o->device);
                return CLI_USAGE;
            }
        } else if (!strcmp(a, "--tp")) {
            ok = cli_take_int(argc, argv, &i, 1, COMM_THREADS_MAX, &o->tp);
        } else if ((kv = cli_kv_take(argc, argv, &i, &o->kv))) {
            ok = kv > 0; /* -1: a bad value, its message printed */
        } else {
            cli_error("generate", "unknown flag '%s' (see --help)", a);
            return CLI_USAGE;
        }
        if (!ok)
            return CLI_USAGE;
    }
    if (!o->model || !o->prompt) {
        cli_error("generate", "--model and --prompt are required (see --help)");
        return CLI_USAGE;
    }
    if (o->device && !strcmp(o->device, "cuda") && o->tp > 1) {
        cli_error("generate", "--device cuda runs one rank (--tp 1)");
        return CLI_USAGE;
    }
    if (o->tp > 1 && o->kv.recall_channels >= 0) { /* the plan's capture op does not carry it */
        cli_error("generate", "--recall-channels is not supported with --tp (the followers rank "
                              "with the default, %d channels)",
                  KV_RECALL_EXACT_CHANNELS);
        return CLI_USAGE;
    }
    o->params.stops = o->stops;
    o->params.n_stops = o->n_stops;
    return 0;
}

static bool stream_text(void *ctx, const char *text, size_t len)
{
    (void)ctx;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return true;
}

/* The prompt as token ids: raw, or rendered through the chat template. */
static ekv_status encode_prompt(const ekv_tokenizer *tok, const gen_opts *o, int32_t **ids,
                                size_t *n, ekv_error *err)
{
    if (!o->chat)
        return tok_encode(tok, o->prompt, strlen(o->prompt), tok_add_bos(tok), o->special, ids, n,
                          err);
    tok_message msgs[2];
    size_t n_msgs = 0;
    if (o->system)
        msgs[n_msgs++] = (tok_message){"system", o->system};
    msgs[n_msgs++] = (tok_message){"user", o->prompt};
    char *text = NULL;
    ekv_status rc = tok_apply_chat(tok, msgs, n_msgs, true, &text, err);
    if (rc == EKV_OK)
        rc = tok_encode(tok, text, strlen(text), tok_add_bos(tok), true, ids, n, err);
    free(text);
    return rc;
}

static void print_json(const gen_result *r, const kvc_policy *kv)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "prompt_tokens", r->prompt_tokens);
    cJSON_AddNumberToObject(o, "completion_tokens", r->n_ids);
    cJSON *ids = cJSON_AddArrayToObject(o, "token_ids");
    for (int32_t i = 0; i < r->n_ids; i++)
        cJSON_AddItemToArray(ids, cJSON_CreateNumber(r->ids[i]));
    cJSON_AddStringToObject(o, "text", r->text ? r->text : "");
    cJSON_AddStringToObject(o, "finish_reason", gen_finish_name(r->finish));
    cJSON_AddNumberToObject(o, "prefill_tokens_per_s",
                            r->prefill_s > 0 ? r->prompt_tokens / r->prefill_s : 0);
    cJSON_AddNumberToObject(o, "decode_tokens_per_s",
                            r->decode_s > 0 && r->n_ids > 0 ? r->n_ids / r->decode_s : 0);
    cJSON_AddNumberToObject(o, "kv_bytes_prompt", (double)r->kv_bytes_prompt);
    cJSON_AddNumberToObject(o, "kv_bytes", (double)r->kv_bytes);
    cJSON_AddNumberToObject(o, "kv_bytes_peak", (double)r->kv_bytes_peak);
    if (r->scope.delta) { /* SCOPE ran */
        cJSON_AddNumberToObject(o, "scope_evicted", (double)r->scope.evicted);
        cJSON_AddNumberToObject(o, "scope_decode_held", r->scope.decode_held);
        cJSON_AddNumberToObject(o, "scope_decode_peak", r->scope.decode_peak);
    }
    if (r->recall.digest_blocks) { /* recall ran (kvrecall.h) */
        const double steps = r->n_ids > 1 ? r->n_ids - 1 : 1; /* decode forwards */
        cJSON_AddNumberToObject(o, "recall_evicted_tokens", (double)r->recall.evicted_tokens);
        cJSON_AddNumberToObject(o, "recall_digest_blocks", (double)r->recall.digest_blocks);
        cJSON_AddNumberToObject(o, "recall_blocks", (double)r->recall.blocks_recalled);
        cJSON_AddNumberToObject(o, "recall_bytes_per_token", r->recall.bytes_recalled / steps);
        cJSON_AddNumberToObject(o, "recall_deadline_misses", (double)r->recall.deadline_misses);
        /* the mode that ran: token recall ranks every step and promotes nothing */
        cJSON_AddStringToObject(o, "recall_mode", kv->recall_gather ? "tokens" : "blocks");
        cJSON_AddNumberToObject(o, "recall_gather", kv->recall_gather);
        cJSON_AddNumberToObject(o, "recall_promote",
                                !kv->recall_gather && !kv->recall_no_promote);
        cJSON_AddNumberToObject(o, "recall_promotions", (double)r->recall.promotions);
        cJSON_AddNumberToObject(o, "recall_rankings", (double)r->recall.selections);
        cJSON_AddNumberToObject(o, "recall_select_s", r->recall.select_s);
        cJSON_AddNumberToObject(o, "recall_buffer_bytes", (double)r->recall.buffer_bytes);
    }
    if (r->grammar_s > 0)
        cJSON_AddNumberToObject(o, "grammar_mask_s", r->grammar_s);
    char *s = cJSON_PrintUnformatted(o);
    if (s)
        puts(s);
    free(s);
    cJSON_Delete(o);
}

int cmd_generate(int argc, char **argv)
{
    gen_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc < 0 ? CLI_OK : rc;
    ekv_error err = {0};
    int ret = CLI_FAIL;
    ekv_runtime *rt = NULL;
    kv_pool *kv = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    gen_result res = {0};
    kvc_profile *profile = NULL;
    comm_threads_group *group = NULL;
    ekv_comm *comm = NULL;
    tp_rank *ranks = NULL;
    int started = 0;
    if (o.response_format &&
        grammar_get(o.response_format, strlen(o.response_format), &o.params.grammar, &err)) {
        cli_error("generate", "--response-format: %s", err.msg);
        return CLI_USAGE;
    }
    ekv_model *m = model_load(o.model, &err);
    if (!m)
        goto fail;
    const ekv_model_config *c = model_config(m);
    const int32_t ctx = o.ctx ? o.ctx : c->n_ctx_train;
    if (encode_prompt(model_tokenizer(m), &o, &ids, &n_ids, &err))
        goto fail;
    if (n_ids == 0) {
        cli_error("generate", "the prompt encodes to no tokens");
        ret = CLI_USAGE;
        goto out;
    }
    if (n_ids >= (size_t)ctx) {
        cli_error("generate", "the prompt has %zu tokens but the context is %d (use --ctx)",
                  n_ids, ctx);
        ret = CLI_USAGE;
        goto out;
    }
    if ((ret = cli_kv_policy("generate", &o.kv, m, o.model, &o.params.kv, &profile)) != CLI_OK)
        goto out;
    ret = CLI_FAIL;
    if (o.params.kv.method != KVC_FULL) {
        int32_t mean;
        if (kvc_policy_mean_tokens(&o.params.kv, (int32_t)n_ids, &mean, &err)) {
            cli_error("generate", "%s", err.msg);
            ret = CLI_USAGE;
            goto out;
        }
    }
    int threads = o.threads;
    if (o.tp > 1) {
        /* the cores are shared by the ranks */
        const long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = (int)((threads ? threads : (cores > 0 ? cores : 1)) / o.tp);
        threads = threads > 0 ? threads : 1;
        if (!(group = comm_threads_group_create(o.tp, &err)) ||
            !(comm = comm_open_thread(group, 0, &err)))
            goto fail;
        if (!(ranks = calloc((size_t)o.tp, sizeof *ranks))) {
            err = (ekv_error){.code = EKV_ENOMEM};
            snprintf(err.msg, sizeof err.msg, "out of memory");
            goto fail;
        }
        for (int r = 1; r < o.tp; r++, started++) {
            ranks[r] = (tp_rank){.g = group, .rank = r, .threads = threads, .m = m, .ctx = ctx,
                                 .ids = ids, .n_ids = (int32_t)n_ids, .params = &o.params};
            if (pthread_create(&ranks[r].th, NULL, tp_follower, &ranks[r])) {
                snprintf(err.msg, sizeof err.msg, "cannot start rank %d", r);
                goto fail;
            }
        }
    }
    if (o.device && !strcmp(o.device, "cuda")) {
#ifdef EKV_HAVE_CUDA
        rt = model_runtime_create_cuda(m, 512, ctx, 0, ctx, &err);
#else
        ekv_error_set(&err, EKV_EUNSUPPORTED,
                      "--device cuda: this build has no CUDA backend (EKV_CUDA=OFF)");
#endif
    } else {
        rt = model_runtime_create_tp(m, 512, ctx, threads, comm, &err);
    }
    kv = rt ? model_kv_pool_create_shard(m, model_runtime_shard(rt), ctx, &err) : NULL;
    if (!kv)
        goto fail;
    if (gen_run(rt, kv, ids, (int32_t)n_ids, &o.params, o.json ? NULL : stream_text, NULL, &res,
                &err))
        goto fail;
    if (o.json)
        print_json(&res, &o.params.kv);
    else
        putchar('\n');
    ret = CLI_OK;
    goto out;
fail:
    cli_error("generate", "%s", err.msg);
out:
    if (group && ret != CLI_OK)
        comm_threads_group_abort(group); /* no follower waits for a plan that never comes */
    for (int r = 1; r <= started; r++) {
        pthread_join(ranks[r].th, NULL);
        if (ranks[r].rc && ret == CLI_OK) {
            cli_error("generate", "rank %d: %s", r, ranks[r].err.msg);
            ret = CLI_FAIL;
        }
    }
    free(ranks);
    gen_result_free(&res);
    free(ids);
    kv_pool_destroy(kv);
    model_runtime_free(rt);
    comm_free(comm);
    comm_threads_group_free(group);
    kvc_profile_free(profile);
    model_free(m);
    grammar_release(o.params.grammar);
    return ret;
}
