"""AO code parsing against the real code strings of GRAZPEDWRI-DX (docs/grazpedwri-dx.md)."""

import pytest

from physis.ao import parse_code, parse_field, split_codes


@pytest.mark.parametrize(
    "raw, bone, segment, subsegment, child, severity, normalized",
    [
        ("23r-M/3.1", "radius", 3, "M", 3, 1, "23r-M/3.1"),
        ("23r-M/2.1", "radius", 3, "M", 2, 1, "23r-M/2.1"),
        ("23u-E/7", "ulna", 3, "E", 7, None, "23u-E/7"),
        ("23-M/3.1", "both", 3, "M", 3, 1, "23-M/3.1"),
        ("23r-E/2.1", "radius", 3, "E", 2, 1, "23r-E/2.1"),
        ("22r-D/2.1", "radius", 2, "D", 2, 1, "22r-D/2.1"),
        ("23r-E/1", "radius", 3, "E", 1, None, "23r-E/1"),
        # dirty variants present in the release
        ("23u-E/7 ", "ulna", 3, "E", 7, None, "23u-E/7"),
        ("23u-E7", "ulna", 3, "E", 7, None, "23u-E/7"),
        ("23r-M3.1", "radius", 3, "M", 3, 1, "23r-M/3.1"),
        ("23u/E/7", "ulna", 3, "E", 7, None, "23u-E/7"),
        ("23u-M/2.", "ulna", 3, "M", 2, None, "23u-M/2"),
        ("23r-E/1 ", "radius", 3, "E", 1, None, "23r-E/1"),
        ("23-M2.1", "both", 3, "M", 2, 1, "23-M/2.1"),
        ("23r-M/2.1[1,7]", "radius", 3, "M", 2, 1, "23r-M/2.1"),
    ],
)
def test_forearm_codes(raw, bone, segment, subsegment, child, severity, normalized):
    code = parse_code(raw)
    assert code.kind == "forearm"
    assert (code.bone, code.segment, code.subsegment, code.child, code.severity) == (
        bone, segment, subsegment, child, severity)
    assert code.normalized == normalized


@pytest.mark.parametrize("raw, sh", [("23r-E/1", 1), ("23r-E/2.1", 2), ("23u-E/3", 3), ("23r-E/4", 4),
                                     ("23-E/2.1", 2), ("23u-E/7", None), ("23r-M/2.1", None),
                                     ("22r-D/1", None)])
def test_salter_harris_only_for_e1_to_e4(raw, sh):
    code = parse_code(raw)
    assert code.salter_harris == sh
    assert code.is_physeal == (sh is not None)


@pytest.mark.parametrize("raw", ["72B(b)", "72B(c)", "72B.(b)", "77.2.1A", "76.2.A"])
def test_non_forearm_adult_codes_pass_through_as_other(raw):
    code = parse_code(raw)
    assert code.kind == "other"
    assert code.normalized == raw and not code.is_physeal


@pytest.mark.parametrize("raw", ["23r-X/9?", "fracture", "23", "E/2"])
def test_unparsable_codes_are_kept_as_unknown(raw):
    assert parse_code(raw).kind == "unknown"


@pytest.mark.parametrize(
    "field, expected",
    [
        ("23r-M/3.1; 23u-E/7", ["23r-M/3.1", "23u-E/7"]),
        ("23r-M/3.1;23u-E/7", ["23r-M/3.1", "23u-E/7"]),
        ("23r-M/3.1;  23u-E/7 ", ["23r-M/3.1", "23u-E/7"]),
        ("23r-E/2.1, 23u-E/7", ["23r-E/2.1", "23u-E/7"]),
        ("23r-M/2.1[1,7]; 23u-E/7", ["23r-M/2.1[1,7]", "23u-E/7"]),
        ("", []),
        (None, []),
    ],
)
def test_split_on_every_real_separator(field, expected):
    assert split_codes(field) == expected


def test_parse_field_mixed():
    codes = parse_field("23r-E/2.1; 23u-E7; 72B(b); ???")
    assert [c.kind for c in codes] == ["forearm", "forearm", "other", "unknown"]
    assert [c.salter_harris for c in codes] == [2, None, None, None]
