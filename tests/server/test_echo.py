"""Client strings in statuses and log lines: bounded, one line, no keys added."""

from __future__ import annotations

from latentd.server.echo import ECHO_CHARS, STATUS_CHARS, bounded, log_value, quoted


def test_quoted_strings_are_escaped_and_cut_with_their_length():
    assert quoted("tiny") == "'tiny'"
    assert quoted("a\nb\r\x1b\u2028") == repr("a\nb\r\x1b\u2028") and "\n" not in quoted("a\nb")
    long = quoted("x" * 100_000)
    assert long.startswith(repr("x" * ECHO_CHARS)) and long.endswith("... (100000 characters)")
    assert len(long) < ECHO_CHARS + 40


def test_log_values_are_bare_only_when_they_cannot_add_keys():
    assert log_value("req-42") == "req-42" and log_value("a1b2c3") == "a1b2c3" and log_value("") == ""
    for hostile in ("a b", "x code=OK", "a\nid=FORGED", "x\"y", "\u2028", "k=v"):
        value = log_value(hostile)
        assert value == quoted(hostile) and value[0] in "'\"" and value[-1] == value[0]
        assert "\n" not in value and "\u2028" not in value
    assert len(log_value("i" * (8 << 20))) < ECHO_CHARS + 40


def test_status_messages_are_bounded():
    assert bounded("short") == "short"
    message = bounded("m" * 100_000)
    assert len(message) <= STATUS_CHARS and message.endswith("(100000 characters)")
