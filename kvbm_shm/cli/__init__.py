"""`kvbm-shm`: one command, one module per subcommand; each module has `add_parser` and `run`.

`main(argv) -> int` is the console script. Errors (a `KvbmError`, or a file the command cannot
use) go to stderr as one line, without a traceback, with exit status 2.
"""
