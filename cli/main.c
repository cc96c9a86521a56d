/*
 * main.c - the entrokv binary: one executable, one subcommand per process
 * role or tool (see docs/ARCHITECTURE.md).
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: entrokv <command> [flags]\n"
            "\n"
            "commands:\n"
            "  generate     run a prompt through a model and stream the completion\n"
            "  fetch-model  download the demo model (SmolLM2-135M-Instruct, Q4_1) into models/\n"
            "  bench        benchmarks (bench generate | kvstore | restore | tp)\n"
            "  kvstore      run a KV store daemon (UCX)\n"
            "  serve        serve a model over gRPC and OpenAI-compatible HTTP\n"
            "  worker       a model's step engine behind the internal Worker gRPC service\n"
            "  coordinator  gRPC + HTTP front that routes to `entrokv worker` processes\n"
            "  eval         KV compression quality: eval ppl | passkey | sweep\n"
            "  calibrate    write a model's UNComp head-group profile from real text\n"
            "\n"
            "`entrokv <command> --help` lists a command's flags.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return CLI_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "generate"))
        return cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "fetch-model"))
        return cmd_fetch_model(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench"))
        return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "kvstore"))
        return cmd_kvstore(argc - 1, argv + 1);
    if (!strcmp(cmd, "serve"))
        return cmd_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "worker"))
        return cmd_worker(argc - 1, argv + 1);
    if (!strcmp(cmd, "coordinator"))
        return cmd_coordinator(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval"))
        return cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "calibrate"))
        return cmd_calibrate(argc - 1, argv + 1);
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return CLI_OK;
    }
    fprintf(stderr, "entrokv: unknown command '%s'\n", cmd);
    usage(stderr);
    return CLI_USAGE;
}
