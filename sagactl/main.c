/* sagactl: the command-line tool for saga definitions and, against a database, sagas. */
#include <stdio.h>
#include <string.h>

#include "commands.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *usage;
} commands[] = {
    {"validate", cmd_validate, "validate [PATH...]          check definitions (default: sagas/)"},
    {"render", cmd_render, "render FILE --format mermaid|dot   draw a saga's steps"},
    {"migrate", cmd_migrate, "migrate --database-url URL  apply the SQL migrations"},
    {"start", cmd_start, "start NAME --input JSON [--idempotency-key K] [--correlation-id C]"},
    {"status", cmd_status, "status ID                   a saga and its step timeline"},
    {"list", cmd_list, "list [--status S] [--saga NAME] [--since DURATION] [--limit N]"},
    {"retry", cmd_retry, "retry ID                    resume a failed saga"},
    {"abort", cmd_abort, "abort ID --reason TEXT      make a running saga compensate"},
    {"stuck", cmd_stuck, "stuck                       failed sagas and deadlines nobody fires"},
};

static void usage(FILE *out)
{
    fputs("usage: sagactl COMMAND [ARGS]\n\ncommands:\n", out);
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(out, "  %s\n", commands[i].usage);
    fputs("\nDatabase commands take --database-url URL (else SAGA_DATABASE_URL, else PG*) and\n"
          "--json. Exit codes: 0 done, 1 database error or request refused, 2 bad arguments,\n"
          "4 no such saga.\n",
          out);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 2, argv + 2);
    }
    fprintf(stderr, "sagactl: unknown command \"%s\"\n", argv[1]);
    usage(stderr);
    return 2;
}
