"""Operations on a bank: the end-to-end `m3 run`, rebuilds published as `live`, their lock,
schedule and run log, Ray job submission, bank statistics."""
