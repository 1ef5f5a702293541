/* sagactl validate / render: the saga definition commands. Both only read files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "commands.h"
#include "definition.h"
#include "diag.h"

static const char validate_usage[] = "usage: sagactl validate [PATH...]\n"
                                     "  PATH: a definition file or a directory of *.json files "
                                     "(default: sagas)\n";
static const char render_usage[] = "usage: sagactl render FILE [--format mermaid|dot]\n";

static void print_errors(const struct diag_list *errs)
{
    for (size_t i = 0; i < errs->count; i++)
        fprintf(stderr, "%s\n", errs->items[i]);
}

static void print_summary(const struct saga_definition *def)
{
    printf("%s: %s v%d, %zu step%s, ", def->source_label, def->name, def->version, def->step_count,
           def->step_count == 1 ? "" : "s");
    if (def->pivot_index >= 0)
        printf("pivot %s\n", def->steps[def->pivot_index].name);
    else
        printf("no pivot\n");
}

/* Validates one file or directory; prints a summary line per valid definition. Returns 0
 * when everything under path is valid. */
static int validate_path(const char *path, struct diag_list *errs)
{
    struct stat st;

    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        struct saga_definition **defs = NULL;
        size_t count = 0;
        int rc = saga_definition_load_dir(path, &defs, &count, errs);
        for (size_t i = 0; i < count; i++) {
            print_summary(defs[i]);
            saga_definition_destroy(defs[i]);
        }
        free(defs);
        if (rc == 0 && count == 0) {
            /* Most likely a wrong path: say so rather than "all valid". */
            diag_addf(errs, "%s: no *.json definition files", path);
            rc = -1;
        }
        return rc;
    }
    struct saga_definition *def = NULL;
    if (saga_definition_load_file(path, &def, errs) < 0)
        return -1;
    print_summary(def);
    saga_definition_destroy(def);
    return 0;
}

int cmd_validate(int argc, char **argv)
{
    struct diag_list errs = {0};
    int first = 0;
    int rc = 0;

    if (argc > 0 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"))) {
        fputs(validate_usage, stdout);
        return 0;
    }
    if (argc > 0 && !strcmp(argv[0], "--")) {
        first = 1;
    } else {
        for (int i = 0; i < argc; i++) {
            if (argv[i][0] == '-') {
                fprintf(stderr, "sagactl validate: unknown option \"%s\"\n", argv[i]);
                fputs(validate_usage, stderr);
                return 2;
            }
        }
    }
    if (first == argc) {
        if (validate_path("sagas", &errs) < 0)
            rc = 2;
    }
    for (int i = first; i < argc; i++) {
        if (validate_path(argv[i], &errs) < 0)
            rc = 2;
    }
    fflush(stdout);
    print_errors(&errs);
    diag_clear(&errs);
    return rc;
}

/* Mermaid labels are quoted strings that may hold HTML: '"' would end them early and '<' could
 * open a tag. Mermaid's entity codes keep the text as written. */
static void mermaid_text(const char *s)
{
    for (; *s; s++) {
        if (*s == '"')
            fputs("#quot;", stdout);
        else if (*s == '<')
            fputs("#lt;", stdout);
        else if (*s == '>')
            fputs("#gt;", stdout);
        else if (*s == '\n' || *s == '\r')
            putchar(' ');
        else
            putchar(*s);
    }
}

static void dot_text(const char *s)
{
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            putchar('\\');
        if (*s == '\n' || *s == '\r')
            putchar(' ');
        else
            putchar(*s);
    }
}

/* Index of the compensation that runs first when step idx fails (the nearest compensated
 * step before it), or -1 when there is nothing to undo. */
static int first_compensation_before(const struct saga_definition *def, size_t idx)
{
    for (size_t i = idx; i-- > 0;) {
        if (def->steps[i].has_compensation)
            return (int)i;
    }
    return -1;
}

static bool step_can_fail(const struct saga_definition *def, size_t idx)
{
    /* The pivot may still fail for good (a business "failure" reply); after it, steps are
     * retried until they succeed. */
    return def->pivot_index < 0 || idx <= (size_t)def->pivot_index;
}

static void render_mermaid(const struct saga_definition *def)
{
    printf("flowchart TD\n");
    printf("    start([\"");
    mermaid_text(def->name);
    printf(" v%d\"])\n", def->version);
    for (size_t i = 0; i < def->step_count; i++) {
        const struct saga_step_def *step = &def->steps[i];
        bool pivot = (int)i == def->pivot_index;
        bool retriable = def->pivot_index >= 0 && (int)i > def->pivot_index;
        printf("    s%zu%s\"%s%s<br/>", i, pivot ? "{{" : "[", step->name,
               pivot       ? " (pivot)"
               : retriable ? " (retriable)"
                           : "");
        mermaid_text(step->participant);
        printf(": ");
        mermaid_text(step->command.type);
        printf("\"%s\n", pivot ? "}}" : "]");
    }
    printf("    completed([\"completed\"])\n");
    printf("    compensated([\"compensated\"])\n");
    for (size_t i = def->step_count; i-- > 0;) {
        const struct saga_step_def *step = &def->steps[i];
        if (!step->has_compensation)
            continue;
        printf("    c%zu[\"undo %s<br/>", i, step->name);
        mermaid_text(step->participant);
        printf(": ");
        mermaid_text(step->compensation.type);
        printf("\"]\n");
    }
    printf("    start --> s0\n");
    for (size_t i = 0; i + 1 < def->step_count; i++)
        printf("    s%zu --> s%zu\n", i, i + 1);
    printf("    s%zu --> completed\n", def->step_count - 1);
    for (size_t i = 0; i < def->step_count; i++) {
        if (!step_can_fail(def, i))
            continue;
        int c = first_compensation_before(def, i);
        if (c >= 0)
            printf("    s%zu -. fails .-> c%d\n", i, c);
        else
            printf("    s%zu -. fails .-> compensated\n", i);
    }
    for (size_t i = def->step_count; i-- > 0;) {
        if (!def->steps[i].has_compensation)
            continue;
        int c = first_compensation_before(def, i);
        if (c >= 0)
            printf("    c%zu -.-> c%d\n", i, c);
        else
            printf("    c%zu -.-> compensated\n", i);
    }
}

static void render_dot(const struct saga_definition *def)
{
    printf("digraph \"");
    dot_text(def->name);
    printf("\" {\n");
    printf("    rankdir=TB;\n");
    printf("    node [shape=box];\n");
    printf("    start [shape=oval, label=\"");
    dot_text(def->name);
    printf(" v%d\"];\n", def->version);
    for (size_t i = 0; i < def->step_count; i++) {
        const struct saga_step_def *step = &def->steps[i];
        bool pivot = (int)i == def->pivot_index;
        bool retriable = def->pivot_index >= 0 && (int)i > def->pivot_index;
        printf("    s%zu [label=\"%s%s\\n", i, step->name,
               pivot       ? " (pivot)"
               : retriable ? " (retriable)"
                           : "");
        dot_text(step->participant);
        printf(": ");
        dot_text(step->command.type);
        printf("\"%s];\n", pivot ? ", shape=hexagon, style=bold" : "");
    }
    printf("    completed [shape=oval];\n");
    printf("    compensated [shape=oval];\n");
    for (size_t i = def->step_count; i-- > 0;) {
        const struct saga_step_def *step = &def->steps[i];
        if (!step->has_compensation)
            continue;
        printf("    c%zu [style=dashed, label=\"undo %s\\n", i, step->name);
        dot_text(step->participant);
        printf(": ");
        dot_text(step->compensation.type);
        printf("\"];\n");
    }
    printf("    start -> s0;\n");
    for (size_t i = 0; i + 1 < def->step_count; i++)
        printf("    s%zu -> s%zu;\n", i, i + 1);
    printf("    s%zu -> completed;\n", def->step_count - 1);
    for (size_t i = 0; i < def->step_count; i++) {
        if (!step_can_fail(def, i))
            continue;
        int c = first_compensation_before(def, i);
        if (c >= 0)
            printf("    s%zu -> c%d [style=dashed, label=\"fails\"];\n", i, c);
        else
            printf("    s%zu -> compensated [style=dashed, label=\"fails\"];\n", i);
    }
    for (size_t i = def->step_count; i-- > 0;) {
        if (!def->steps[i].has_compensation)
            continue;
        int c = first_compensation_before(def, i);
        if (c >= 0)
            printf("    c%zu -> c%d [style=dashed];\n", i, c);
        else
            printf("    c%zu -> compensated [style=dashed];\n", i);
    }
    printf("}\n");
}

int cmd_render(int argc, char **argv)
{
    const char *file = NULL;
    const char *format = "mermaid";
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;

    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(render_usage, stdout);
            return 0;
        } else if (!strcmp(argv[i], "--format") && i + 1 < argc) {
            format = argv[++i];
        } else if (!strncmp(argv[i], "--format=", 9)) {
            format = argv[i] + 9;
        } else if (argv[i][0] == '-' || file) {
            fprintf(stderr, "sagactl render: unexpected argument \"%s\"\n", argv[i]);
            fputs(render_usage, stderr);
            return 2;
        } else {
            file = argv[i];
        }
    }
    if (!file) {
        fputs(render_usage, stderr);
        return 2;
    }
    if (strcmp(format, "mermaid") != 0 && strcmp(format, "dot") != 0) {
        fprintf(stderr, "sagactl render: unknown format \"%s\" (mermaid or dot)\n", format);
        fputs(render_usage, stderr);
        return 2;
    }
    if (saga_definition_load_file(file, &def, &errs) < 0) {
        print_errors(&errs);
        diag_clear(&errs);
        return 2;
    }
    if (!strcmp(format, "dot"))
        render_dot(def);
    else
        render_mermaid(def);
    saga_definition_destroy(def);
    return fflush(stdout) == 0 ? 0 : 1;
}
