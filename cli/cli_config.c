/*
 * cli_config.c - flags from the environment and from a JSON config file
 * (docs/serving.md, "Configuration"), for the long-running subcommands.
 *
 * Both sources are turned into ordinary "--flag value" arguments placed
 * before the command line's own: the file's first, then the environment's,
 * then the command line. Every flag parser keeps the last value it sees, so
 * the precedence command line > environment > file > default needs no code
 * of its own, and a value from either source goes through exactly the
 * checks the same flag gets on the command line.
 *
 * Names: --grpc-port is "grpc-port" in the file and ENTROKV_GRPC_PORT in the
 * environment. A key or variable that is no flag of the subcommand is an
 * error (exit 2) rather than ignored, so a typo in a deployment cannot
 * silently fall back to a default.
 */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

extern char **environ;

#define CONFIG_MAX_BYTES (1 << 20)
#define FLAG_MAX 64

/* ENTROKV_* variables that are not flags: ENTROKV_ISA (kernels/cpu: the
 * matmul kernel), ENTROKV_CONFIG (the file below), ENTROKV_BIN (the binary
 * the test and benchmark scripts run). */
static const char *const not_flags[] = {"isa", "config", "bin", NULL};

static const cli_flag *find_flag(const cli_flag *flags, const char *name)
{
    for (const cli_flag *f = flags; f->name; f++)
        if (!strcmp(f->name, name))
            return f;
    return NULL;
}

/* Appends a copy of s[0..n) to a's argv; origin names where it came from
 * (NULL: the command line), copied. */
static int push_from(cli_args *a, const char *s, size_t n, const char *origin)
{
    if (a->argc + 1 >= a->cap) {
        int cap = a->cap ? 2 * a->cap : 32;
        char **p = realloc(a->argv, (size_t)cap * sizeof *p);
        char **o = p ? realloc(a->origin, (size_t)cap * sizeof *o) : NULL;
        if (p)
            a->argv = p;
        if (!o)
            return -1;
        a->origin = o;
        a->cap = cap;
    }
    a->origin[a->argc] = origin ? strdup(origin) : NULL;
    if (origin && !a->origin[a->argc])
        return -1;
    char *copy = malloc(n + 1);
    if (!copy)
        return -1;
    memcpy(copy, s, n);
    copy[n] = 0;
    a->argv[a->argc++] = copy;
    a->argv[a->argc] = NULL;
    return 0;
}

static int push(cli_args *a, const char *s, size_t n)
{
    return push_from(a, s, n, NULL);
}

static int push_flag(cli_args *a, const char *name, const char *origin)
{
    char flag[FLAG_MAX + 3];
    int n = snprintf(flag, sizeof flag, "--%s", name);
    return push_from(a, flag, (size_t)n, origin);
}

/* Whether argv[1..] (the command line) sets --name itself. */
static bool on_command_line(int argc, char **argv, const char *name)
{
    for (int i = 1; i < argc; i++)
        if (!strncmp(argv[i], "--", 2) && !strcmp(argv[i] + 2, name))
            return true;
    return false;
}

static bool in_env(const char *name)
{
    char var[FLAG_MAX + 9] = "ENTROKV_";
    size_t n = strlen(name);
    if (n > FLAG_MAX)
        return false;
    for (size_t i = 0; i <= n; i++)
        var[8 + i] = name[i] == '-' ? '_' : (char)toupper((unsigned char)name[i]);
    return getenv(var) != NULL;
}

/* One JSON value as a flag's text: strings as they are, integers without a
 * fraction, arrays (of strings or numbers) joined by commas as the list
 * flags (--workers, --peers) take them. */
static bool value_text(const cJSON *v, char *out, size_t cap)
{
    if (cJSON_IsString(v))
        return snprintf(out, cap, "%s", v->valuestring) < (int)cap;
    if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (!isfinite(d))
            return false;
        if (d == floor(d) && fabs(d) < 1e15)
            return snprintf(out, cap, "%.0f", d) < (int)cap;
        return snprintf(out, cap, "%.17g", d) < (int)cap;
    }
    if (cJSON_IsArray(v)) {
        size_t n = 0;
        out[0] = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (cJSON_IsArray(e) || !value_text(e, out + n + (n > 0), cap - n - (n > 0)))
                return false;
            if (n > 0)
                out[n] = ',';
            n += strlen(out + n);
        }
        return n > 0;
    }
    return false;
}

static char *read_file(const char *path, const char *cmd)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        cli_error(cmd, "--config %s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(CONFIG_MAX_BYTES + 1);
    size_t n = buf ? fread(buf, 1, CONFIG_MAX_BYTES + 1, f) : 0;
    bool err = ferror(f);
    fclose(f);
    if (!buf || err || n > CONFIG_MAX_BYTES) {
        cli_error(cmd, "--config %s: %s", path,
                  !buf ? "out of memory" : err ? "read error" : "larger than 1 MiB");
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    return buf;
}

static int from_file(const char *cmd, const cli_flag *flags, const char *path, int argc,
                     char **argv, cli_args *a)
{
    char *text = read_file(path, cmd);
    if (!text)
        return CLI_USAGE;
    cJSON *root = cJSON_Parse(text);
    free(text);
    int rc = CLI_OK;
    if (!cJSON_IsObject(root)) {
        cli_error(cmd, "--config %s: not a JSON object (%s)", path,
                  root ? "another JSON value" : "malformed JSON");
        rc = CLI_USAGE;
    }
    const cJSON *item;
    char value[8192], origin[300];
    for (item = root && rc == CLI_OK ? root->child : NULL; item && rc == CLI_OK;
         item = item->next) {
        const char *key = item->string;
        const cli_flag *f = find_flag(flags, key);
        snprintf(origin, sizeof origin, "key \"%.64s\" of %.200s", key, path);
        bool overridden = f && (on_command_line(argc, argv, key) || in_env(key));
        if (!f || !strcmp(key, "config")) {
            cli_error(cmd, "--config %s: unknown key \"%s\": `entrokv %s` has no flag --%s",
                      path, key, cmd, key);
            rc = CLI_USAGE;
        } else if (f->is_switch) {
            if (!cJSON_IsBool(item)) {
                cli_error(cmd, "--config %s: \"%s\" is a switch: use true or false", path, key);
                rc = CLI_USAGE;
            } else if (cJSON_IsTrue(item) && !overridden && push_flag(a, key, origin)) {
                rc = CLI_FAIL;
            }
        } else if (!value_text(item, value, sizeof value)) {
            cli_error(cmd, "--config %s: \"%s\" needs a string, a number or a list of them",
                      path, key);
            rc = CLI_USAGE;
        } else if (!overridden && (push_flag(a, key, origin) ||
                                   push_from(a, value, strlen(value), origin))) {
            rc = CLI_FAIL;
        }
    }
    cJSON_Delete(root);
    return rc;
}

/* ENTROKV_GRPC_PORT -> "grpc-port"; false when the name is not one. */
static bool env_flag_name(const char *var, size_t len, char *out)
{
    if (len == 0 || len > FLAG_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char ch = var[i];
        if (!(isupper((unsigned char)ch) || isdigit((unsigned char)ch) || ch == '_'))
            return false;
        out[i] = ch == '_' ? '-' : (char)tolower((unsigned char)ch);
    }
    out[len] = 0;
    return true;
}

static bool ends_with(const char *s, size_t n, const char *suffix)
{
    size_t k = strlen(suffix);
    return n >= k && !memcmp(s + n - k, suffix, k);
}

/* Whether NAME=value (NAME without "ENTROKV_") is one of the variables
 * Kubernetes puts into every pod for each Service of the namespace (service
 * links): a Service called entrokv-coordinator gives
 * ENTROKV_COORDINATOR_SERVICE_HOST, ..._SERVICE_PORT[_NAME],
 * ..._PORT=tcp://IP:PORT and ..._PORT_<n>_TCP[_PROTO|_PORT|_ADDR]. They
 * are not meant for us, and refusing them would stop every pod of a
 * namespace that has such a Service. */
static bool k8s_service_link(const char *name, size_t n, const char *value)
{
    char buf[FLAG_MAX * 2];
    if (n >= sizeof buf)
        return false;
    memcpy(buf, name, n);
    buf[n] = 0;
    if (strstr(buf, "SERVICE_HOST") || strstr(buf, "SERVICE_PORT"))
        return true;
    if (ends_with(buf, n, "PORT") &&
        (!strncmp(value, "tcp://", 6) || !strncmp(value, "udp://", 6) ||
         !strncmp(value, "sctp://", 7)))
        return true;
    const char *p = strstr(buf, "PORT_");
    return p && isdigit((unsigned char)p[5]) &&
           (strstr(p, "_TCP") || strstr(p, "_UDP") || strstr(p, "_SCTP"));
}

static bool is_switch_on(const char *v)
{
    return !strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on");
}

static int from_env(const char *cmd, const cli_flag *flags, int argc, char **argv, cli_args *a)
{
    static const char prefix[] = "ENTROKV_";
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, prefix, sizeof prefix - 1))
            continue;
        const char *var = *e + sizeof prefix - 1, *eq = strchr(var, '=');
        if (!eq)
            continue;
        char name[FLAG_MAX + 1];
        if (k8s_service_link(var, (size_t)(eq - var), eq + 1))
            continue;
        if (!env_flag_name(var, (size_t)(eq - var), name)) {
            cli_error(cmd, "environment: %.*s is not a flag name", (int)(eq - *e), *e);
            return CLI_USAGE;
        }
        bool skip = false;
        for (int i = 0; not_flags[i]; i++)
            skip |= !strcmp(name, not_flags[i]);
        if (skip)
            continue;
        const cli_flag *f = find_flag(flags, name);
        if (!f) {
            cli_error(cmd,
                      "environment: %.*s: `entrokv %s` has no flag --%s (variables that are "
                      "not flags: ENTROKV_ISA, ENTROKV_CONFIG, ENTROKV_BIN)",
                      (int)(eq - *e), *e, cmd, name);
            return CLI_USAGE;
        }
        if (on_command_line(argc, argv, name))
            continue;
        char origin[FLAG_MAX + 16];
        snprintf(origin, sizeof origin, "%.*s", (int)(eq - *e), *e);
        if (f->is_switch) {
            if (is_switch_on(eq + 1) && push_flag(a, name, origin))
                return CLI_FAIL;
        } else if (push_flag(a, name, origin) ||
                   push_from(a, eq + 1, strlen(eq + 1), origin)) {
            return CLI_FAIL;
        }
    }
    return CLI_OK;
}

void cli_args_free(cli_args *a)
{
    for (int i = 0; i < a->argc; i++) {
        free(a->argv[i]);
        free(a->origin[i]);
    }
    free(a->argv);
    free(a->origin);
    memset(a, 0, sizeof *a);
}

void cli_args_explain(const char *cmd, const cli_args *a)
{
    for (int i = 1; i < a->argc; i++) {
        if (!a->origin[i])
            continue;
        bool value = i + 1 < a->argc && a->origin[i + 1] && !strcmp(a->origin[i], a->origin[i + 1]);
        cli_error(cmd, "note: %s%s%s came from %s", a->argv[i], value ? " " : "",
                  value ? a->argv[i + 1] : "", a->origin[i]);
        i += value;
    }
}

int cli_config_args(const char *cmd, const cli_flag *flags, int argc, char **argv, cli_args *out)
{
    memset(out, 0, sizeof *out);
    /* --config on the command line wins over ENTROKV_CONFIG */
    const char *path = getenv("ENTROKV_CONFIG");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config")) {
            if (i + 1 >= argc) {
                cli_error(cmd, "--config needs a value");
                return CLI_USAGE;
            }
            path = argv[++i];
        }
    }
    int rc = push(out, argv[0], strlen(argv[0])) ? CLI_FAIL : CLI_OK;
    if (rc == CLI_OK && path && *path)
        rc = from_file(cmd, flags, path, argc, argv, out);
    if (rc == CLI_OK)
        rc = from_env(cmd, flags, argc, argv, out);
    for (int i = 1; i < argc && rc == CLI_OK; i++) {
        if (!strcmp(argv[i], "--config"))
            i++;
        else if (push(out, argv[i], strlen(argv[i])))
            rc = CLI_FAIL;
    }
    if (rc == CLI_FAIL)
        cli_error(cmd, "out of memory");
    if (rc != CLI_OK)
        cli_args_free(out);
    return rc;
}
