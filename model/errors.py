"""The root of every error m3 raises on purpose.

An `M3Error` is something the person running m3 can fix (the input, the config, the bank, the
cluster): its message says what is wrong and, where it can, what to do. The `m3` command prints
it as one line and exits 2; any other exception is a bug and keeps its traceback. It lives in
the bottom layer so that every layer (model <- storage <- pipelines <- jobs) can derive from it.
Each subclass also keeps the builtin base it had (ValueError, RuntimeError) for callers that
catch those.
"""


class M3Error(Exception):
    pass
