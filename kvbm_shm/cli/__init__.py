"""`kvbm-shm`: one command, one module per subcommand; each module has `add_parser` and `run`.

`main(argv) -> int` is the console script. Errors go to stderr with a non-zero exit code.
"""
