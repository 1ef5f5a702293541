/* libFuzzer target: any byte string through the definition parser and validator. It must
 * never crash, leak or read out of bounds, whatever the input; errors are the normal case. */
#include <stddef.h>
#include <stdint.h>

#include "definition.h"
#include "diag.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;

    if (saga_definition_parse("fuzz.json", (const char *)data, size, &def, &errs) == 0)
        saga_definition_destroy(def);
    diag_clear(&errs);
    return 0;
}
