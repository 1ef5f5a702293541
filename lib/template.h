/* template: renders "{{path}}" placeholders in command payloads and keys.
 *
 * A string that is exactly "{{path}}" becomes the JSON value at that path, type kept; a
 * {{path}} inside a longer string is interpolated as text (strings raw, other values as
 * compact JSON). Paths: input.<k>[.<k>...], steps.<step>.reply[.<k>...], saga.id,
 * saga.name, saga.correlation_id. The context is a JSON object
 *   { "input": {...}, "steps": { "<step>": { "reply": {...} } },
 *     "saga": { "id": "...", "name": "...", "correlation_id": "..." } }. */
#ifndef SAGA_TEMPLATE_H
#define SAGA_TEMPLATE_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* Renders tmpl against ctx. On success returns 0 and *out is a new value the caller frees
 * with cJSON_Delete(). A path with no value renders as null (exact placeholder) or as an
 * empty string (interpolated): a reply that lacks a field must not wedge a saga. Returns -1
 * with a message in err only for malformed templates (unclosed "{{", empty path) or on
 * allocation failure. tmpl and ctx are borrowed. */
__attribute__((warn_unused_result)) int template_render(const cJSON *tmpl, const cJSON *ctx,
                                                        cJSON **out, char *err, size_t errlen);

/* Renders a string template to text (for keys): strings as they are, other values as
 * compact JSON, null as "". On success *out is a new string the caller frees with free(). */
__attribute__((warn_unused_result)) int template_render_text(const cJSON *tmpl, const cJSON *ctx,
                                                             char **out, char *err, size_t errlen);

/* Renders tmpl to compact JSON text: the same bytes as cJSON_PrintUnformatted() of what
 * template_render() makes, without making it (the orchestrator renders every command's
 * payload so). Same errors. On success *out is a new string the caller frees with free(). */
__attribute__((warn_unused_result)) int template_render_json(const cJSON *tmpl, const cJSON *ctx,
                                                             char **out, char *err, size_t errlen);

/* Appends v (borrowed) to the text *buf of *len bytes (*cap allocated, *len <= *cap; *buf
 * may be NULL), growing it with realloc: the same bytes as cJSON_PrintUnformatted(v),
 * NUL-terminated. The caller owns *buf (free() it). Returns 0, or -1 where that returns NULL
 * (out of memory, an invalid item); *len is then unchanged (*buf and *cap may have grown:
 * *buf is still the caller's) and, if *len < *cap, (*buf)[*len] is '\0' (a full buffer is
 * not written past its end). */
__attribute__((warn_unused_result)) int template_print_json(char **buf, size_t *len, size_t *cap,
                                                            const cJSON *v);

/* Appends s (borrowed, not NULL) as a JSON string (quoted; '"', '\\' and the control
 * characters escaped as cJSON escapes them, other bytes as they are), as template_print_json
 * appends. Same contract; fails only when out of memory. */
__attribute__((warn_unused_result)) int template_print_string(char **buf, size_t *len, size_t *cap,
                                                              const char *s);

/* Calls cb for every placeholder path found in tmpl (strings, nested arrays and objects).
 * json_path is the JSON path of the string holding it, relative to tmpl ("" for tmpl
 * itself, ".items[2]" below it). Returns 0, or -1 after calling bad_cb (may be NULL) for
 * each malformed placeholder. Both callbacks borrow their arguments. */
typedef void (*template_path_cb)(const char *path, const char *json_path, void *arg);
typedef void (*template_error_cb)(const char *message, const char *json_path, void *arg);
int template_foreach_path(const cJSON *tmpl, template_path_cb path_cb, template_error_cb bad_cb,
                          void *arg);

#endif
