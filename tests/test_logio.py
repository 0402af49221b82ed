"""The measurement log: writer, reader (truncation, garbage, missing header, dangling starts), finding
unfinished runs, and landscapes for replay."""

import json
import os

import pytest
from _helpers import ROOT  # noqa: F401

from deepep_tune.deepep.config import V1, TuneConfig
from deepep_tune.record.log import (
    LogError,
    LogWriter,
    log_path,
    new_run_id,
    newest_unfinished,
    read_landscape,
    read_log,
)
from deepep_tune.tune.measure import Measurer, MeasureSettings

HEADER = {"event": "header", "tool_version": "t", "ep_size": 4, "mode": "quick", "backend": "reference"}


def meas(seq, op="dispatch", s=8, c=4, b=128, t=10.0, status="ok"):
    return {"op": op, "num_sms": s, "nvl_chunk": c, "nvl_buffer": b, "time_us": t if status == "ok" else None,
            "status": status, "role": "search", "seq": seq, "t": 0.0}


def start(seq, op="dispatch", s=8, c=4, b=128):
    return {"event": "start", "seq": seq, "measure": {"op": op, "num_sms": s, "nvl_chunk": c, "nvl_buffer": b,
                                                      "role": "search"}, "t": 0.0}


def write_lines(path, records, tail=""):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


# --- LogWriter -------------------------------------------------------------------------------------

def test_logwriter_refuses_existing_file(tmp_path):
    p = tmp_path / "logs" / "a.jsonl"
    w = LogWriter(str(p), create=True)
    w.write(HEADER)
    w.close()
    before = p.read_text()
    with pytest.raises(LogError) as e:
        LogWriter(str(p), create=True)
    assert str(p) in str(e.value)
    assert p.read_text() == before  # untouched


def test_logwriter_creates_dirs_and_flushes_each_line(tmp_path):
    p = tmp_path / "deep" / "er" / "a.jsonl"
    w = LogWriter(str(p), create=True)
    w.write(HEADER)
    w.write(meas(1))
    # readable before close: a killed process loses nothing written
    assert [json.loads(x) for x in p.read_text().splitlines()] == [HEADER, meas(1)]
    w.close()


def test_logwriter_append_mode(tmp_path):
    p = tmp_path / "a.jsonl"
    w = LogWriter(str(p), create=True)
    w.write(HEADER)
    w.close()
    w = LogWriter(str(p), create=False)
    w.write({"event": "resume", "t": 0})
    w.close()
    assert [json.loads(x)["event"] for x in p.read_text().splitlines()] == ["header", "resume"]


def test_log_path_and_run_id(tmp_path):
    p = log_path(str(tmp_path), 8, "abc")
    assert p == os.path.join(str(tmp_path), "logs", "tune_ep8_abc.jsonl")
    a, b = new_run_id(), new_run_id()
    assert "/" not in a and a


# --- read_log ----------------------------------------------------------------------------------------

def test_read_log_complete(tmp_path):
    p = tmp_path / "l.jsonl"
    recs = [HEADER, start(1), meas(1), start(2, op="combine", c=1), meas(2, op="combine", c=1),
            {"event": "done", "results": "r.json", "t": 0}]
    write_lines(p, recs)
    log = read_log(str(p))
    assert log.header == HEADER
    assert log.measurements == [meas(1), meas(2, op="combine", c=1)]
    assert log.finished and log.dangling == [] and log.truncated_line is None


def test_read_log_tolerates_truncated_last_line(tmp_path):
    p = tmp_path / "l.jsonl"
    write_lines(p, [HEADER, start(1), meas(1), start(2)], tail=json.dumps(meas(2))[:25])
    log = read_log(str(p))
    assert log.truncated_line == 5
    assert log.measurements == [meas(1)]
    assert [d["seq"] for d in log.dangling] == [2]
    assert not log.finished


def test_read_log_rejects_garbage_in_the_middle(tmp_path):
    p = tmp_path / "l.jsonl"
    write_lines(p, [HEADER, meas(1)], tail='{"op": "disp\n' + json.dumps(meas(2)) + "\n")
    with pytest.raises(LogError) as e:
        read_log(str(p))
    assert f"{p}:3" in str(e.value)


def test_read_log_rejects_a_cut_line_followed_by_more(tmp_path):
    """A cut-off line is only acceptable as the very last line."""
    p = tmp_path / "l.jsonl"
    write_lines(p, [HEADER, meas(1)], tail=json.dumps(meas(2))[:20] + json.dumps(meas(3)) + "\n")
    with pytest.raises(LogError):
        read_log(str(p))


def test_read_log_requires_header(tmp_path):
    p = tmp_path / "l.jsonl"
    write_lines(p, [meas(1), meas(2)])
    with pytest.raises(LogError) as e:
        read_log(str(p))
    assert "header" in str(e.value)


def test_read_log_rejects_plain_landscape(tmp_path):
    p = tmp_path / "land.jsonl"
    write_lines(p, [{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 1.0}])
    with pytest.raises(LogError, match="header"):
        read_log(str(p))


def test_read_log_empty_and_missing(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(LogError) as e:
        read_log(str(p))
    assert "empty" in str(e.value)
    with pytest.raises(LogError):
        read_log(str(tmp_path / "nope.jsonl"))


def test_read_log_reports_dangling_starts(tmp_path):
    p = tmp_path / "l.jsonl"
    write_lines(p, [HEADER, start(1), meas(1), start(2, s=16, c=6, b=256)])
    log = read_log(str(p))
    assert len(log.dangling) == 1
    d = log.dangling[0]
    assert d["seq"] == 2 and d["measure"]["num_sms"] == 16 and d["measure"]["nvl_chunk"] == 6
    assert log.measurements == [meas(1)]


def test_read_log_resume_settles_dangling(tmp_path):
    p = tmp_path / "l.jsonl"
    crashed = meas(2, s=16, c=6, b=256, status="crashed")
    write_lines(p, [HEADER, start(1), meas(1), start(2, s=16, c=6, b=256), crashed,
                    {"event": "resume", "t": 0, "kept_measurements": 1, "crashed": 1}, start(3), meas(3)])
    log = read_log(str(p))
    assert log.dangling == [] and not log.interrupted
    assert [m["seq"] for m in log.measurements] == [1, 2, 3]
    assert log.measurements[1]["status"] == "crashed"


def test_only_measurements_have_top_level_op(tmp_path):
    """A log written through the Measurer: start events nest their op; measurement lines carry it."""
    from deepep_tune.tune.backends.replay import ReplayBackend
    land = tmp_path / "land.jsonl"
    write_lines(land, [{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 5.0},
                       {"op": "combine", "num_sms": 8, "nvl_chunk": 1, "nvl_buffer": 128, "time_us": 6.0}])
    p = tmp_path / "logs" / "tune_ep2_t.jsonl"
    w = LogWriter(str(p), create=True)
    w.write(HEADER)
    m = Measurer(ReplayBackend(str(land), V1, objective="forward"), MeasureSettings(0, 2), 0, w)
    m.time("dispatch", TuneConfig(8, 4, 128))
    m.time("combine", TuneConfig(8, 1, 128))
    m.remeasure("combine", TuneConfig(8, 1, 128))
    w.close()
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    with_op = [x for x in lines if "op" in x]
    assert len(with_op) == len(m.records) == 3
    assert all("event" not in x for x in with_op)
    assert [x["event"] for x in lines if "op" not in x] == ["header", "start", "start", "start"]
    log = read_log(str(p))
    assert len(log.measurements) == 3 and log.dangling == []
    assert [x["role"] for x in with_op] == ["search", "search", "remeasure"]


# --- newest_unfinished --------------------------------------------------------------------------------------

def test_newest_unfinished(tmp_path):
    out = str(tmp_path)
    done = [HEADER, meas(1), {"event": "done", "t": 0}]
    unfinished = [HEADER, meas(1)]
    paths = {}
    for i, (name, recs, ep) in enumerate([("a", unfinished, 4), ("b", done, 4), ("c", unfinished, 4),
                                          ("d", done, 4), ("e", unfinished, 8)]):
        paths[name] = log_path(out, ep, name)
        write_lines(paths[name], recs)
        os.utime(paths[name], (1000 + i, 1000 + i))
    assert newest_unfinished(out, 4) == paths["c"]
    assert newest_unfinished(out, 8) == paths["e"]
    assert newest_unfinished(out, 2) is None
    # a newer corrupt log is skipped, a newer finished one too
    corrupt = log_path(out, 4, "z")
    write_lines(corrupt, [], tail="garbage\nmore garbage\n")
    os.utime(corrupt, (2000, 2000))
    assert newest_unfinished(out, 4) == paths["c"]
    os.utime(paths["a"], (3000, 3000))
    assert newest_unfinished(out, 4) == paths["a"]


def test_newest_unfinished_none_when_all_done(tmp_path):
    write_lines(log_path(str(tmp_path), 2, "x"), [HEADER, {"event": "done", "t": 0}])
    assert newest_unfinished(str(tmp_path), 2) is None
    assert newest_unfinished(str(tmp_path / "nothing_here"), 2) is None


# --- read_landscape -----------------------------------------------------------------------------------------

def test_read_landscape_plain_first_record_wins(tmp_path):
    p = tmp_path / "land.jsonl"
    recs = [{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 5.0},
            {"op": "combine", "num_sms": 8, "nvl_chunk": 1, "nvl_buffer": 128, "time_us": 6},
            {"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 99.0}]
    write_lines(p, recs, tail="\n")  # a trailing blank line is fine
    got = read_landscape(str(p), V1)
    assert len(got) == 2
    by = {(r["op"], r["num_sms"], r["nvl_chunk"], r["nvl_buffer"]): r["time_us"] for r in got}
    assert by == {("dispatch", 8, 4, 128): 5.0, ("combine", 8, 1, 128): 6}


def test_read_landscape_from_tool_log(tmp_path):
    p = tmp_path / "l.jsonl"
    write_lines(p, [HEADER, start(1), meas(1, t=10.0), start(2, op="combine", c=1), meas(2, op="combine", c=1, t=4.0),
                    meas(3, t=12.0), {"event": "done", "t": 0}])
    got = read_landscape(str(p), V1)
    assert [(r["op"], r["time_us"]) for r in got] == [("dispatch", 10.0), ("combine", 4.0)]
    assert all("event" not in r for r in got)


@pytest.mark.parametrize("bad,why", [
    ("not json at all", "valid JSON"),
    ('{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128}', "time_us"),
    ('{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": null}', "time_us"),
    ('{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": "5"}', "time_us"),
    ('{"op": "gather", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 5.0}', "op"),
    ('{"op": "dispatch", "num_sms": "8", "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 5.0}', "num_sms"),
    ('{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4.5, "nvl_buffer": 128, "time_us": 5.0}', "nvl_chunk"),
    ("[1, 2, 3]", "op"),
])
def test_read_landscape_bad_line(tmp_path, bad, why):
    p = tmp_path / "land.jsonl"
    good = json.dumps({"op": "dispatch", "num_sms": 8, "nvl_chunk": 2, "nvl_buffer": 128, "time_us": 5.0})
    p.write_text(good + "\n" + bad + "\n" + good + "\n")
    with pytest.raises(LogError) as e:
        read_landscape(str(p), V1)
    msg = str(e.value)
    assert f"{p}:2" in msg  # says which line
    assert why in msg


def test_read_landscape_empty(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(LogError):
        read_landscape(str(p), V1)
    p.write_text("\n\n")
    with pytest.raises(LogError):
        read_landscape(str(p), V1)
    header_only = tmp_path / "h.jsonl"
    write_lines(header_only, [HEADER])
    with pytest.raises(LogError):
        read_landscape(str(header_only), V1)


# --- cut-off lines and later appends ------------------------------------------------------------------------

def test_drop_partial_line(tmp_path):
    from deepep_tune.record.log import drop_partial_line
    p = tmp_path / "l.jsonl"
    write_lines(p, [HEADER, meas(1)], tail=json.dumps(meas(2))[:30])
    drop_partial_line(str(p))
    assert p.read_text() == json.dumps(HEADER) + "\n" + json.dumps(meas(1)) + "\n"
    drop_partial_line(str(p))  # a complete file is left alone
    assert p.read_text() == json.dumps(HEADER) + "\n" + json.dumps(meas(1)) + "\n"
    w = LogWriter(str(p), create=False)
    w.write(meas(3))
    w.close()
    log = read_log(str(p))
    assert [m["seq"] for m in log.measurements] == [1, 3] and log.truncated_line is None


def test_launcher_note_after_cut_off_line_keeps_log_readable(tmp_path):
    from deepep_tune.tune.interrupts import mark_interrupted
    p = tmp_path / "logs" / "tune_ep2_x.jsonl"
    write_lines(p, [HEADER, start(1), meas(1), start(2)], tail=json.dumps(meas(2))[:30])  # a rank killed mid-write
    mark_interrupted(str(p), ranks_gone=True)
    log = read_log(str(p))
    assert log.measurements == [meas(1)]
    assert log.dangling == []  # the interrupted note settles the config in flight
