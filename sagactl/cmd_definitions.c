#include <stdio.h>

#include "commands.h"

int cmd_validate(int argc, char **argv)
{
    fputs("sagactl validate: not built yet\n", stderr);
    return 1;
}

int cmd_render(int argc, char **argv)
{
    fputs("sagactl render: not built yet\n", stderr);
    return 1;
}
