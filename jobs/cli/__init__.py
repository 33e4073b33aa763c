"""The `m3` command line: argument parsing and dispatch (main), the operations' commands (ops),
and the entrypoint of a job submitted to a cluster (entry)."""
