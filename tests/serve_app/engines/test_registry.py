"""Engines register by pipeline: each family's record names its engine, which loads that pipeline class."""

import pytest

from serve_app.domain.families import FAMILIES
from serve_app.engines import engine_class, nunchaku_families


@pytest.mark.parametrize("pipeline", FAMILIES)
def test_every_family_names_an_engine_of_its_pipeline_that_builds_its_tiny_checkpoint(pipeline):
    engine = engine_class(pipeline)
    assert engine.pipeline_class == pipeline
    assert callable(engine.build_tiny)


def test_nunchaku_families_are_those_the_records_mark():
    assert set(nunchaku_families()) == {p for p, family in FAMILIES.items() if family.nunchaku}
    assert "QwenImage21Pipeline" not in nunchaku_families()
