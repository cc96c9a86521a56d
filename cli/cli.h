/*
 * cli.h - subcommand entry points and the small flag-parsing helpers they
 * share. Only cli/ (and bench/, which provides `entrokv bench`) may print
 * errors and choose exit codes.
 */
#ifndef ENTROKV_CLI_H
#define ENTROKV_CLI_H

#include <stdbool.h>
#include <stdint.h>

#define EKV_DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"

int cmd_generate(int argc, char **argv);
int cmd_fetch_model(int argc, char **argv);
int cmd_bench(int argc, char **argv);

/* Exit codes: 0 ok, 1 runtime failure, 2 usage error. */
enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

/* Flag parsing: each returns false (after printing a message naming the flag)
 * when the value is missing or malformed. *i is advanced past the value. */
bool cli_take_str(int argc, char **argv, int *i, const char **out);
bool cli_take_int(int argc, char **argv, int *i, long min, long max, int32_t *out);
bool cli_take_float(int argc, char **argv, int *i, double min, double max, float *out);
bool cli_take_u64(int argc, char **argv, int *i, uint64_t *out);

/* Prints "entrokv <cmd>: message" to stderr. */
void cli_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
