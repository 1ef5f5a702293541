/* definition: the saga definition model (sagas/NAME.json), its loader and its validator.
 *
 * A definition is immutable once loaded; the engine and the orchestrator only read it. */
#ifndef SAGA_DEFINITION_H
#define SAGA_DEFINITION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "diag.h"

struct saga_retry_policy {
    int max_attempts;       /* >= 1: sends of one step before giving up (compensatable steps) */
    int64_t backoff_ms;     /* first wait before a resend */
    int64_t max_backoff_ms; /* cap of the exponential backoff */
};

/* A command or a compensation: where it goes and what it carries. The templates are
 * rendered by template_render() against the saga's context at send time. */
struct saga_message_def {
    char *topic;    /* owned */
    char *type;     /* owned: header event-type */
    cJSON *key;     /* owned template (a JSON string) or NULL: the saga id */
    cJSON *payload; /* owned template (any JSON value) */
};

struct saga_step_def {
    char *name;        /* owned */
    char *participant; /* owned */
    bool pivot;
    struct saga_message_def command;
    /* has_compensation is false for an explicit "compensation": null and for the pivot and
     * the steps after it (they are never compensated). */
    bool has_compensation;
    struct saga_message_def compensation; /* valid when has_compensation */
    int64_t timeout_ms;                   /* step timeout, or the default */
    struct saga_retry_policy retry;       /* step retry, or the default; compensations too */
};

struct saga_definition {
    char *name;             /* owned */
    int version;            /* >= 1 */
    char *description;      /* owned, may be NULL */
    char **required_inputs; /* owned array of owned strings */
    size_t required_count;
    char *reply_topic; /* owned */
    int64_t default_timeout_ms;
    struct saga_retry_policy default_retry;
    struct saga_step_def *steps; /* owned array */
    size_t step_count;           /* >= 1 */
    int pivot_index;             /* index of the pivot step, or -1 when there is none */
    char *source_label;          /* owned: the file name used in messages ("sagas/x.json") */
    cJSON *body;                 /* owned: the whole parsed document, for saga.definitions */
};

/* Parses and validates one definition. label names the source in messages (for example
 * "sagas/order.json"). On success returns 0 and *out is a new definition that the caller
 * frees with saga_definition_destroy(). On failure returns -1, leaves *out NULL and appends
 * every error found to errs, each as "LABEL: JSON.PATH: message" (syntax errors as
 * "LABEL:LINE:COL: message"). */
__attribute__((warn_unused_result)) int saga_definition_parse(const char *label, const char *text,
                                                              size_t len,
                                                              struct saga_definition **out,
                                                              struct diag_list *errs);

/* Reads and parses one file; label is the path as given. Same contract as the parse. */
__attribute__((warn_unused_result)) int
saga_definition_load_file(const char *path, struct saga_definition **out, struct diag_list *errs);

/* Loads every *.json file of a directory, in name order. A file with errors is rejected as a
 * whole; the others still load. Two files that define the same (name, version) is an error.
 * On return *defs is a new array (free each with saga_definition_destroy(), then free the
 * array) and *count its length. Returns 0 when every file loaded, -1 when any error was
 * appended to errs. */
__attribute__((warn_unused_result)) int saga_definition_load_dir(const char *dir,
                                                                 struct saga_definition ***defs,
                                                                 size_t *count,
                                                                 struct diag_list *errs);

/* Index of the step named name, or -1. */
int saga_definition_step_index(const struct saga_definition *def, const char *name);

/* Frees a definition. Accepts NULL. */
void saga_definition_destroy(struct saga_definition *def);

#endif
