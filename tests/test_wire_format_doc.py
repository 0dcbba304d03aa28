"""docs/wire-format.md's control-plane section lists exactly the messages and fields `proto/control.py` declares."""

from __future__ import annotations

import re
from pathlib import Path

from proto.control import MESSAGE_TYPES, PROTOCOL_VERSION, Measurements, message_type

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


def control_section() -> str:
    text = DOC.read_text()
    start = text.index("## Control plane (`proto/control.py`)")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def table_rows(section: str, header: str) -> list[list[str]]:
    """The cells of each row of the table whose header line starts with `header`."""
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`(\w+)`", cell)


def test_every_message_and_field_is_documented():
    rows = table_rows(control_section(), "| type | model |")
    documented = {names(row[0])[0]: (names(row[1])[0], names(row[3])) for row in rows}
    assert set(documented) == {message_type(m) for m in MESSAGE_TYPES}
    for model in MESSAGE_TYPES:
        model_name, fields = documented[message_type(model)]
        assert model_name == model.__name__
        assert fields == [f for f in model.model_fields if f not in ("v", "type")], model.__name__


def test_every_measurement_is_documented_in_order():
    rows = table_rows(control_section(), "| field | type |")
    assert [names(row[0])[0] for row in rows] == list(Measurements.model_fields)
    for row in rows:
        annotation = str(Measurements.model_fields[names(row[0])[0]].annotation)
        assert row[1] in annotation, (row, annotation)


def test_the_documented_version_is_the_protocol_version():
    assert f'{{"v": {PROTOCOL_VERSION}, "type": "<type>", ...fields}}' in control_section()
