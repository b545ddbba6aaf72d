"""The bundle format's documentation is checked against the typed records that read and write it."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO

from serve.bundle.records import RunRecord, VariantRecord
from serve.bundle.sections import GenerationSection, TextSection, TokenizerSection

DOC = REPO / "docs" / "bundle-format.md"


@pytest.mark.parametrize("record", [RunRecord, VariantRecord, TextSection, TokenizerSection, GenerationSection])
def test_every_field_of_every_record_is_documented(record):
    text = DOC.read_text()
    fields = [f.name for f in dataclasses.fields(record) if f.name != "extra"]
    assert fields, f"{record.__name__} has no fields"
    missing = [name for name in fields if f"`{name}`" not in text]
    assert not missing, f"docs/bundle-format.md does not describe {record.__name__}.{missing}"
    assert f"`{record.__name__}`" in text or record.__name__ in text
