#include <stdio.h>

#include "commands.h"

int cmd_migrate(int argc, char **argv)
{
    fputs("sagactl migrate: not built yet\n", stderr);
    return 1;
}
