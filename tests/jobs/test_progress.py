"""Progress lines: the first and last step always print, the ones between at most every
`every_s`; each says done of total, rows and rate when known, and the time left."""

from jobs.progress import Progress


def test_first_and_last_step_print_and_the_rest_wait_for_the_interval():
    lines = []
    p = Progress("encode", total=4, rows=400, every_s=3600, out=lines.append)
    for _ in range(4):
        p.step(rows=100)
    assert len(lines) == 2
    assert lines[0].startswith("encode: 1 of 4 shard(s), 100 rows, ") and "rows/s" in lines[0]
    assert lines[0].endswith(" s left")
    assert lines[1].startswith("encode: 4 of 4 shard(s), 400 rows, ") and "left" not in lines[1]


def test_every_step_prints_with_no_interval_and_rows_are_optional():
    lines = []
    p = Progress("clean", total=3, unit="task(s)", every_s=0, out=lines.append)
    for _ in range(3):
        p.step()
    assert [line.split(",")[0] for line in lines] == [f"clean: {i} of 3 task(s)" for i in (1, 2, 3)]
    assert all("rows" not in line for line in lines)
