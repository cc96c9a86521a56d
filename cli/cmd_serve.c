/*
 * cmd_serve.c - the serving processes, one file since they share nearly
 * everything (docs/serving.md):
 *   `entrokv serve`: the all-in-one server. Loads the model, starts one step
 *     engine, puts it behind the coordinator as its only worker group, and
 *     serves gRPC (entrokv.v1.Generation, grpc.health.v1.Health) and HTTP
 *     (OpenAI-compatible, /health, /metrics) until SIGTERM or SIGINT.
 *   `entrokv worker`: the engine behind gRPC only; the coordinator reaches
 *     it through the internal entrokv.v1.Worker service.
 *   `entrokv coordinator`: tokenizes, routes and streams, with remote
 *     workers as its groups; it loads the model only for the tokenizer.
 *
 * Shutdown (docs/serving.md, "Lifecycle"): the first signal fails
 * readiness at once (/readyz 503, gRPC health NOT_SERVING) while new
 * requests are still accepted for --drain-grace seconds, so load balancers
 * stop sending before the door closes; then new requests are refused and
 * the running streams get until --drain-timeout seconds after the signal to
 * finish, after which the rest are cancelled; exit 0. A second signal exits
 * at once with 128 + the signal's number.
 *
 * The flags, their defaults and --help are serve_opts.c's; every flag can
 * also come from ENTROKV_<FLAG> or a --config file (cli_config.c).
 *
 * Signals are blocked before any thread starts, so every thread inherits
 * the mask and only this thread receives them (sigtimedwait).
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "serve_opts.h"
#include "serve_security.h"
#include "entrokv/comm.h"
#include "entrokv/coordinator.h"
#include "entrokv/engine.h"
#include "entrokv/grpc_server.h"
#include "entrokv/http.h"
#include "entrokv/kvprefix.h"
#include "entrokv/kvrecall_store.h"
#include "entrokv/kvstore.h"
#include "entrokv/metrics.h"
#include "entrokv/model.h"
#include "worker_tp.h"

/* Everything the server holds, torn down in reverse order of creation. */
typedef struct server {
    ekv_model *model;
    kvstore_client *kvstore;  /* the KV store tier: host pool and daemons */
    kvstore_client *recall_kvstore; /* --recall-host-mb: the daemons alone, for recall blocks */
    kv_recall_tier *recall_tier;    /* the engine's recall counters, and cap */
    kvprefix *prefix;
    engine_prefix_cache prefix_cache;
    const struct serve_opts *opts; /* worker --tp: each follower thread's tier from them */
    ekv_engine *engine;
    ekv_metrics *metrics;
    ekv_coordinator *coord;
    ekv_grpc *grpc;
    ekv_grpc *worker_grpc;       /* serve --worker-port: the internal Worker service */
    ekv_http *http;
    serve_sec sec;               /* TLS files and the API key, read at start */
    kvc_profile *profile;        /* the UNComp profile requests use, or NULL */
    worker_tp *tp;               /* worker --tp: the group's ranks */
    bool tp_follower;            /* under mpirun, rank > 0: followed, served nothing */
    metrics_kvstore *kv_metrics; /* set once metrics exist (atomic: the engine reads it) */
} server;

/* --model-name, or the GGUF's file name without directory and ".gguf". */
static void model_id(const serve_opts *o, char *out, size_t cap)
{
    if (o->model_name) {
        snprintf(out, cap, "%s", o->model_name);
        return;
    }
    const char *base = strrchr(o->model, '/');
    base = base ? base + 1 : o->model;
    size_t n = strlen(base);
    if (n > 5 && !strcmp(base + n - 5, ".gguf"))
        n -= 5;
    snprintf(out, cap, "%.*s", (int)n, base);
}

/* The public listeners: gRPC (Generation and Health) and HTTP, with TLS and
 * the API key as the flags say; then the log line the tests and operators
 * read the ports from. */
static ekv_status start_public(const serve_opts *o, server *s, ekv_error *err)
{
    ekv_grpc_opts go = {.host = o->host, .port = o->grpc_port, .services = EKV_GRPC_GENERATION,
                        .tls = &s->sec.tls_public, .api_key = &s->sec.api_key};
    if (!(s->grpc = ekv_grpc_start_opts(s->coord, &go, err)))
        return err->code;
    if (o->sec.worker_port >= 0) {
        ekv_grpc_opts wo = {.host = o->host, .port = o->sec.worker_port,
                            .services = EKV_GRPC_WORKER, .tls = &s->sec.tls};
        if (!(s->worker_grpc = ekv_grpc_start_opts(s->coord, &wo, err)))
            return err->code;
    }
    ekv_http_opts ho;
    ekv_http_opts_default(&ho);
    ho.host = o->host;
    ho.port = o->http_port;
    ho.tls = &s->sec.tls_public;
    ho.api_key = &s->sec.api_key;
    ho.max_connections = (unsigned)o->sec.http_max_connections;
    ho.max_per_client = (unsigned)o->sec.http_max_per_client;
    ho.timeout_s = (unsigned)o->sec.http_timeout;
    if (!(s->http = ekv_http_start_opts(s->coord, &ho, err)))
        return err->code;
    char worker[160] = "";
    if (s->worker_grpc)
        snprintf(worker, sizeof worker, " worker=%s:%d", o->host, ekv_grpc_port(s->worker_grpc));
    coord_log("listening grpc=%s:%d http=%s:%d%s", o->host, ekv_grpc_port(s->grpc), o->host,
              ekv_http_port(s->http), worker);
    coord_log("security: tls=%s api_key=%s worker_client_certs=%s http_timeout=%ds "
              "http_max_per_client=%d",
              ekv_tls_server_on(&s->sec.tls) ? "on" : "off", s->sec.api_key.set ? "on" : "off",
              s->sec.tls.client_ca_pem ? "required" : "no", o->sec.http_timeout,
              o->sec.http_max_per_client);
    return EKV_OK;
}

static ekv_status start_coordinator(const serve_opts *o, server *s, int32_t ctx, ekv_error *err)
{
    s->metrics = metrics_create();
    if (!s->metrics)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    coord_config cc;
    coord_config_default(&cc);
    char name[128];
    model_id(o, name, sizeof name);
    cc.model_name = name;
    char identity[160]; /* workers serving another model are refused */
    kvprefix_model_id(s->model, identity, sizeof identity);
    cc.model_identity = identity;
    cc.max_prompt_bytes = (size_t)o->max_prompt_bytes;
    cc.max_ctx = ctx;
    cc.default_max_tokens = o->default_max_tokens < ctx ? o->default_max_tokens : ctx;
    cc.default_kv_method = o->kv_method;
    cc.default_kv_budget = o->kv_budget;
    s->coord = coord_create(model_tokenizer(s->model), &cc, s->metrics, err);
    if (!s->coord)
        return err->code;
    coord_set_worker_tls(s->coord, &s->sec.worker_tls);
    if (coord_add_workers(s->coord, o->workers, o->dns_interval, err))
        return err->code;
    coord_log("coordinator: model=\"%s\" ctx=%d workers=%s (%s)", name, ctx, o->workers,
              s->sec.worker_tls.ca_pem ? "TLS" : "plaintext");
    return start_public(o, s, err);
}

/* ---- the KV store tier ---- */

static void kvstore_log(void *arg, const char *line)
{
    coord_log("kvstore: %s", line);
}

/* *a = v unless *a already holds more: the engine thread and the store's
 * worker both publish, and a counter must never go back. */
static void store_max(atomic_uint_fast64_t *a, uint64_t v)
{
    uint_fast64_t cur = atomic_load(a);
    while (cur < v && !atomic_compare_exchange_weak(a, &cur, v))
        ;
}

/* Copies the tier's totals into the metrics /metrics renders (after each
 * restore, each save and each save's completion). */
static void kvstore_publish(server *s)
{
    metrics_kvstore *mk = __atomic_load_n(&s->kv_metrics, __ATOMIC_ACQUIRE);
    if (!mk)
        return;
    kvprefix_stats ps;
    kvprefix_stats_get(s->prefix, &ps);
    const kvstore_metrics *km = kvstore_client_metrics(s->kvstore);
    store_max(&mk->hits, ps.restored_blocks);
    store_max(&mk->misses, ps.restore_misses);
    for (int t = 0; t < 2; t++) {
        const kvstore_tier_metrics *tm = &km->tier[t ? KVSTORE_TIER_REMOTE : KVSTORE_TIER_LOCAL];
        store_max(&mk->bytes_in[t], atomic_load(&tm->bytes_in));
        store_max(&mk->bytes_out[t], atomic_load(&tm->bytes_out));
    }
    store_max(&mk->restore_ns_sum, atomic_load(&km->restore_ns_sum));
    store_max(&mk->restore_count, atomic_load(&km->restore_count));
}

static void *prefix_restore_start(void *ctx, const int32_t *tokens, int32_t n,
                                  int32_t max_tokens, void (*wake)(void *), void *wake_arg)
{
    server *s = ctx;
    return kvprefix_restore_start(s->prefix, tokens, n, max_tokens, wake, wake_arg);
}

static bool prefix_restore_ready(void *ctx, void *job)
{
    return kvprefix_restore_ready(job);
}

static int32_t prefix_restore_finish(void *ctx, void *job, kv_seq *seq)
{
    server *s = ctx;
    const int32_t got = kvprefix_restore_finish(job, seq);
    kvstore_publish(s);
    return got;
}

static void prefix_saved(void *ctx)
{
    kvstore_publish(ctx);
}

static void prefix_save(void *ctx, const kv_seq *seq, const int32_t *tokens, int32_t n,
                        int32_t first_block)
{
    server *s = ctx;
    kvprefix_save(s->prefix, seq, tokens, n, first_block);
    kvstore_publish(s);
}

/* Under TP, rank 0 logs each restore's agreement (docs/tp.md, "The KV
 * store tier"): what every rank held and what all of them kept. */
static void prefix_tp_agreed(void *ctx, const int32_t *held, int32_t n_ranks, int32_t agreed)
{
    char list[256];
    size_t n = 0;
    for (int32_t r = 0; r < n_ranks && n < sizeof list - 16; r++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s%d", r ? "," : "", held[r]);
    coord_log("kvstore: tensor-parallel restore: ranks hold %s tokens, every rank keeps %d%s",
              list, agreed, agreed ? "" : " (recomputes the prompt)");
}

/* The host pool (--kvstore-mb) and the daemons (--kvstore-peers), if any:
 * a client. In a tensor-parallel group (tp_size > 1) a follower waits for
 * its restore inside a collective (docs/tp.md, "The KV store tier"), so a
 * remote op's timeout is at most a quarter of the group's: a stalled
 * daemon is a miss there, not a broken group. */
static ekv_status open_kvstore(const serve_opts *o, const ekv_model *m, int tp_size,
                               kvstore_client **client, kvstore_client **recall_client,
                               ekv_error *err)
{
    kvstore_client_config kc;
    kvstore_client_config_default(&kc);
    if (tp_size > 1 && kc.op_timeout_ms > o->tp_timeout_ms / 4)
        kc.op_timeout_ms = o->tp_timeout_ms / 4;
    kc.local_capacity = (uint64_t)o->kvstore_mb << 20;
    kc.log = kvstore_log;
    const char *peers[64];
    char *list = o->kvstore_peers ? strdup(o->kvstore_peers) : NULL, *save = NULL;
    uint8_t *token = NULL, *ns_key = NULL;
    size_t token_len = 0, ns_key_len = 0;
    ekv_status rc = EKV_OK;
    char ns[160];
    if (o->kvstore_ns)
        snprintf(ns, sizeof ns, "%s", o->kvstore_ns);
    else
        kvprefix_model_id(m, ns, sizeof ns);
    kc.ns = ns;
    if (o->kvstore_ns_key_file) {
        if ((rc = kvstore_token_load(o->kvstore_ns_key_file, &ns_key, &ns_key_len, err)))
            goto out;
        kc.ns_key = ns_key;
        kc.ns_key_len = ns_key_len;
    }
    for (char *p = list ? strtok_r(list, ",", &save) : NULL; p && kc.n_peers < 64;
         p = strtok_r(NULL, ",", &save))
        peers[kc.n_peers++] = p;
    if (kc.n_peers) {
        if ((rc = kvstore_token_load(o->kvstore_token_file, &token, &token_len, err)))
            goto out;
        kc.peers = peers;
        kc.auth_token = token;
        kc.auth_token_len = token_len;
    }
    if (!(*client = kvstore_client_create(&kc, err))) {
        rc = err->code ? err->code : EKV_ENOMEM;
        goto out;
    }
    if (recall_client && o->recall_host_mb >= 0) { /* no host tier to copy blocks into */
        kc.local_capacity = 0;
        kc.promote_remote_hits = false;
        if (!(*recall_client = kvstore_client_create(&kc, err))) {
            rc = err->code ? err->code : EKV_ENOMEM;
            goto out;
        }
    }
    coord_log("kvstore: host tier %d MiB, %d daemon(s)", o->kvstore_mb, kc.n_peers);
out:
    if (token) {
        memset(token, 0, token_len);
        free(token);
    }
    if (ns_key) {
        memset(ns_key, 0, ns_key_len);
        free(ns_key);
    }
    free(list);
    return rc;
}

/* This process's tier (rank tp_rank of tp_size; 0 of 1 without TP). */
static ekv_status start_kvstore(const serve_opts *o, server *s, int tp_rank, int tp_size,
                                ekv_error *err)
{
    if (o->kvstore_mb == 0 && !o->kvstore_peers)
        return EKV_OK;
    if (open_kvstore(o, s->model, tp_size, &s->kvstore, &s->recall_kvstore, err) ||
        !(s->prefix = kvprefix_create(s->model, s->kvstore, tp_rank, tp_size, err)))
        return err->code ? err->code : EKV_ENOMEM;
    kvprefix_on_saved(s->prefix, prefix_saved, s);
    s->prefix_cache = (engine_prefix_cache){prefix_restore_start, prefix_restore_ready,
                                            prefix_restore_finish, prefix_save, s,
                                            tp_size > 1 ? prefix_tp_agreed : NULL};
    if (s->recall_kvstore)
        coord_log("recall: %d MiB of evicted blocks in host memory, the rest on the daemons",
                  o->recall_host_mb);
    return EKV_OK;
}

/* ---- a tensor-parallel group's tiers: every rank its own (worker_tp.h) ---- */

/* A follower thread's tier: its client and kvprefix, no metrics. */
typedef struct rank_tier {
    kvstore_client *client;
    kvprefix *prefix;
    engine_prefix_cache pc;
} rank_tier;

static void *rank_restore_start(void *ctx, const int32_t *tokens, int32_t n, int32_t max_tokens,
                                void (*wake)(void *), void *wake_arg)
{
    return kvprefix_restore_start(((rank_tier *)ctx)->prefix, tokens, n, max_tokens, wake,
                                  wake_arg);
}

static int32_t rank_restore_finish(void *ctx, void *job, kv_seq *seq)
{
    return kvprefix_restore_finish(job, seq);
}

static void rank_save(void *ctx, const kv_seq *seq, const int32_t *tokens, int32_t n,
                      int32_t first_block)
{
    kvprefix_save(((rank_tier *)ctx)->prefix, seq, tokens, n, first_block);
}

static void tp_tier_close(void *arg, void *handle)
{
    rank_tier *t = handle;
    kvprefix_drain(t->prefix);
    kvstore_client_destroy(t->client);
    kvprefix_destroy(t->prefix);
    free(t);
}

static ekv_status tp_tier_open(void *arg, int rank, int size, bool own,
                               const engine_prefix_cache **out, void **handle, ekv_error *err)
{
    server *s = arg;
    const serve_opts *o = s->opts;
    if (own) {
        if (start_kvstore(o, s, rank, size, err))
            return err->code;
        *out = s->prefix ? &s->prefix_cache : NULL;
        return EKV_OK;
    }
    if (o->kvstore_mb == 0 && !o->kvstore_peers)
        return EKV_OK;
    rank_tier *t = calloc(1, sizeof *t);
    if (!t)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    if (open_kvstore(o, s->model, size, &t->client, NULL, err) ||
        !(t->prefix = kvprefix_create(s->model, t->client, rank, size, err))) {
        kvstore_client_destroy(t->client);
        free(t);
        return err->code ? err->code : EKV_ENOMEM;
    }
    t->pc = (engine_prefix_cache){rank_restore_start, prefix_restore_ready, rank_restore_finish,
                                  rank_save, t, NULL};
    *out = &t->pc;
    *handle = t;
    return EKV_OK;
}

static ekv_status start(const serve_opts *o, server *s, ekv_error *err)
{
    s->model = model_load(o->model, err);
    if (!s->model)
        return err->code;
    const ekv_model_config *mc = model_config(s->model);
    int32_t ctx = o->ctx ? o->ctx : 2048;
    if (mc->n_ctx_train > 0 && ctx > mc->n_ctx_train)
        return ekv_error_set(err, EKV_EINVAL, "--ctx %d exceeds the model's context %d", ctx,
                             mc->n_ctx_train);
    if (o->mode == MODE_COORDINATOR)
        return start_coordinator(o, s, ctx, err);
    /* the offline UNComp profile for kv_method "uncomp" (missing: online, with a warning) */
    kvc_policy probe;
    const cli_kv_opts kv = {.method = "uncomp", .budget = 1.0, .profile = o->kv_profile};
    if (cli_kv_policy(serve_mode_name(o->mode), &kv, s->model, o->model, &probe,
                      &s->profile) != CLI_OK)
        return ekv_error_set(err, EKV_EINVAL, "cannot use the UNComp profile (see above)");
    engine_config ec;
    engine_config_default(&ec);
    const bool tp = o->mode == MODE_WORKER && worker_tp_wanted(o->tp);
    if (tp && o->recall_host_mb >= 0) /* followers have no KV store client to spill to */
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "--recall-host-mb: recall's tier on the KV store daemons is not "
                             "supported in a tensor-parallel group (recall itself runs there, "
                             "each rank's blocks in its host memory; docs/tp.md)");
    if (!tp && start_kvstore(o, s, 0, 1, err)) /* TP: each rank's, in worker_tp_start */
        return err->code;
    ec.prefix_cache = s->prefix ? &s->prefix_cache : NULL;
    kv_recall_backend rb;
    if (s->recall_kvstore)
        kvrecall_store_backend(s->recall_kvstore, &rb);
    if (!(s->recall_tier = kv_recall_tier_create(
              s->recall_kvstore ? (int64_t)o->recall_host_mb << 20 : -1,
              s->recall_kvstore ? &rb : NULL, err)))
        return err->code;
    ec.recall_tier = s->recall_tier;
    ec.n_threads = o->threads;
    ec.max_ctx = ctx;
    ec.kv_tokens = o->kv_tokens ? o->kv_tokens : 4 * ctx;
    ec.max_running = o->max_running;
    ec.max_queued = o->max_queued;
    ec.max_batch = o->max_batch;
    ec.prefill_chunk = o->prefill_chunk;
    ec.reserve_output_pct = o->kv_reserve_output;
    if (cli_device_cuda(o->device)) {
        if (tp)
            return ekv_error_set(err, EKV_EUNSUPPORTED,
                                 "--device cuda runs one rank (no --tp yet; docs/cuda.md)");
        ec.runtime_create = cli_engine_runtime_cuda;
    }
    s->opts = o;
    const worker_tp_tier tier = {tp_tier_open, tp_tier_close, s};
    if (tp && worker_tp_start(o->tp, o->tp_timeout_ms, s->model, &ec, s->profile, &tier, &s->tp,
                              &s->tp_follower, err))
        return err->code;
    if (s->tp_follower)
        return EKV_OK; /* mpirun's rank > 0: rank 0's engine has ended */
    s->engine = engine_create(s->model, &ec, err);
    if (!s->engine)
        worker_tp_abort(s->tp); /* no plan will come */
    s->metrics = s->engine ? metrics_create() : NULL;
    if (!s->metrics)
        return s->engine ? ekv_error_set(err, EKV_ENOMEM, "out of memory") : err->code;
    __atomic_store_n(&s->kv_metrics, metrics_kvstore_counters(s->metrics), __ATOMIC_RELEASE);
    coord_config cc;
    coord_config_default(&cc);
    char name[128];
    model_id(o, name, sizeof name);
    cc.model_name = name;
    char identity[160]; /* workers serving another model are refused */
    kvprefix_model_id(s->model, identity, sizeof identity);
    cc.model_identity = identity;
    cc.max_prompt_bytes = (size_t)o->max_prompt_bytes;
    cc.max_ctx = ctx;
    cc.default_max_tokens = o->default_max_tokens < ctx ? o->default_max_tokens : ctx;
    cc.default_kv_method = o->kv_method;
    cc.default_kv_budget = o->kv_budget;
    cc.uncomp_profile = s->profile;
    s->coord = coord_create(model_tokenizer(s->model), &cc, s->metrics, err);
    if (!s->coord || coord_add_engine(s->coord, "local", s->engine, err))
        return err->code ? err->code : EKV_EINVAL;
    coord_log("%s: model=\"%s\" ctx=%d kv_tokens=%d max_running=%d max_queued=%d uncomp=%s "
              "device=%s",
              serve_mode_name(o->mode), cc.model_name, ctx, ec.kv_tokens, ec.max_running,
              ec.max_queued, s->profile ? "profile" : "online",
              cli_device_cuda(o->device) ? "cuda" : "cpu");
    if (o->mode != MODE_WORKER)
        return start_public(o, s, err);
    /* A worker's one listener is internal: the Worker service, Health, and
     * Generation (a worker answering a request itself is what the split's
     * tests compare the coordinator with; Worker can generate anyway). */
    ekv_grpc_opts wo = {.host = o->host, .port = o->grpc_port,
                        .services = EKV_GRPC_WORKER | EKV_GRPC_GENERATION, .tls = &s->sec.tls};
    if (!(s->grpc = ekv_grpc_start_opts(s->coord, &wo, err)))
        return err->code;
    coord_log("listening grpc=%s:%d", o->host, ekv_grpc_port(s->grpc));
    coord_log("security: tls=%s client_certs=%s", ekv_tls_server_on(&s->sec.tls) ? "on" : "off",
              s->sec.tls.client_ca_pem ? "required" : "no");
    return EKV_OK;
}

static void stop(server *s)
{
    ekv_http_stop(s->http);
    ekv_grpc_free(s->grpc);
    ekv_grpc_free(s->worker_grpc);
    if (s->engine) {
        engine_drain(s->engine);
        engine_destroy(s->engine);
    }
    worker_tp_stop(s->tp); /* the engine's end released the followers */
    coord_free(s->coord);
    kvc_profile_free(s->profile);
    kvprefix_drain(s->prefix); /* the copier's last submits, before the client goes */
    kvstore_client_destroy(s->kvstore); /* first: its last saves' callbacks use the prefix */
    kvprefix_destroy(s->prefix);
    kvstore_client_destroy(s->recall_kvstore); /* finishes the ops whose callbacks use it */
    kv_recall_tier_destroy(s->recall_tier);
    metrics_free(s->metrics);
    model_free(s->model);
    serve_sec_free(&s->sec);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Waits up to timeout_s for one of set; a second signal during the drain
 * ends the process at once (an impatient operator, or Kubernetes' SIGKILL
 * coming anyway). */
static void wait_or_exit(const sigset_t *set, double timeout_s, serve_mode mode)
{
    if (timeout_s <= 0)
        return;
    struct timespec ts = {(time_t)timeout_s, (long)((timeout_s - (time_t)timeout_s) * 1e9)};
    int sig = sigtimedwait(set, NULL, &ts);
    if (sig > 0) {
        coord_log("%s: %s again, exiting now", serve_mode_name(mode), strsignal(sig));
        _exit(128 + sig);
    }
}

static bool idle(server *s)
{
    return ekv_grpc_wait(s->grpc, 0) && (!s->worker_grpc || ekv_grpc_wait(s->worker_grpc, 0)) &&
           (!s->http || ekv_http_active(s->http) == 0);
}

/* The first signal: readiness fails, new work is accepted for the grace
 * period and refused after it, running work gets until the timeout (both
 * counted from the signal) and is then cancelled. */
static void drain(server *s, const serve_opts *o, const sigset_t *set, int sig)
{
    const double t0 = now_s();
    const double grace = o->drain_grace < o->drain_timeout ? o->drain_grace : o->drain_timeout;
    coord_begin_shutdown(s->coord);
    coord_log("%s: %s: not ready; new requests accepted for %g s, running ones get %g s",
              serve_mode_name(o->mode), strsignal(sig), grace, (double)o->drain_timeout);
    wait_or_exit(set, t0 + grace - now_s(), o->mode);
    coord_log("%s: draining: new requests refused", serve_mode_name(o->mode));
    coord_drain(s->coord);
    if (s->http)
        ekv_http_drain(s->http);
    ekv_grpc_drain(s->grpc);
    if (s->worker_grpc)
        ekv_grpc_drain(s->worker_grpc);
    while (!idle(s)) {
        double left = t0 + o->drain_timeout - now_s();
        if (left <= 0) {
            coord_log("%s: drain timeout (%g s): cancelling the requests still running",
                      serve_mode_name(o->mode), (double)o->drain_timeout);
            if (s->http)
                ekv_http_abort(s->http);
            ekv_grpc_cancel_all(s->grpc);
            if (s->worker_grpc)
                ekv_grpc_cancel_all(s->worker_grpc);
            /* the HTTP streams end with an error event within a poll period */
            for (double end = now_s() + 2; !idle(s) && now_s() < end;)
                wait_or_exit(set, 0.05, o->mode);
            break;
        }
        wait_or_exit(set, left < 0.1 ? left : 0.1, o->mode);
    }
    coord_log("%s: drained", serve_mode_name(o->mode));
}

static int run(int argc, char **argv, serve_mode mode)
{
    cli_flag flags[SERVE_FLAGS_MAX];
    serve_mode_flags(mode, flags);
    cli_args args;
    int rc = cli_config_args(serve_mode_name(mode), flags, argc, argv, &args);
    if (rc)
        return rc;
    serve_opts o;
    rc = serve_opts_parse(args.argc, args.argv, mode, &o);
    if (rc) {
        if (rc == CLI_USAGE)
            cli_args_explain(serve_mode_name(mode), &args);
        cli_args_free(&args);
        return rc < 0 ? CLI_OK : rc;
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    server s = {0};
    ekv_error err = {0};
    if (!serve_sec_load(serve_mode_name(mode), &o.sec, &s.sec)) {
        cli_args_free(&args);
        return CLI_FAIL;
    }
    if (start(&o, &s, &err)) {
        cli_error(serve_mode_name(mode), "%s", err.msg);
        stop(&s);
        cli_args_free(&args);
        return CLI_FAIL;
    }
    if (s.tp_follower) { /* mpirun's rank > 0 */
        stop(&s);
        cli_args_free(&args);
        return CLI_OK;
    }
    int sig;
    while ((sig = sigtimedwait(&set, NULL, &(struct timespec){3600, 0})) <= 0) {
    }
    drain(&s, &o, &set, sig);
    stop(&s);
    coord_log("%s: stopped", serve_mode_name(mode));
    cli_args_free(&args);
    return CLI_OK;
}

int cmd_serve(int argc, char **argv)
{
    return run(argc, argv, MODE_SERVE);
}

int cmd_worker(int argc, char **argv)
{
    return run(argc, argv, MODE_WORKER);
}

int cmd_coordinator(int argc, char **argv)
{
    return run(argc, argv, MODE_COORDINATOR);
}
