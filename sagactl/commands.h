/* The sagactl subcommands: each takes the arguments after its name and returns the exit
 * code (0 ok, 1 runtime failure, 2 bad input or usage). */
#ifndef SAGACTL_COMMANDS_H
#define SAGACTL_COMMANDS_H

int cmd_validate(int argc, char **argv);
int cmd_render(int argc, char **argv);
int cmd_migrate(int argc, char **argv);
int cmd_start(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_retry(int argc, char **argv);
int cmd_abort(int argc, char **argv);
int cmd_stuck(int argc, char **argv);

#endif
