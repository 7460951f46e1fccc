"""``pulse near``: bad points and radii are one sentence and exit 2; an unreachable store is
one sentence and exit 1, never a traceback."""

from __future__ import annotations

import pytest

from pipeline.cli import main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["near", "86", "10", "--km", "5"], "latitude must be within"),
        (["near", "59", "200", "--km", "5"], "longitude must be within"),
        (["near", "59", "10", "--km", "0"], "radius must be a positive number"),
        (["near", "59", "10", "--km", "nan"], "radius must be a positive number"),
    ],
)
def test_a_bad_point_or_radius_is_one_sentence(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pulse near: ") and says in err and err.endswith(".\n")
    assert err.count("\n") == 1


def test_a_missing_radius_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["near", "59", "10"])
    assert exc.value.code == 2
    assert "--km" in capsys.readouterr().err


def test_an_unreachable_store_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_STORE_PORT", "1")  # nothing listens there
    assert main(["near", "59", "10", "--km", "5"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("pulse near: cannot read the store at 127.0.0.1:1") and err.count("\n") == 1
    )
    assert err.endswith(".\n") and not err.endswith("..\n")
