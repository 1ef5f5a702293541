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
};

static void usage(FILE *out)
{
    fputs("usage: sagactl COMMAND [ARGS]\n\ncommands:\n", out);
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(out, "  %s\n", commands[i].usage);
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
