"""Replicas made in these tests stop their threads when the test ends, as Serve stops a replica.

A replica left running keeps its memory sampler recording into Ray's metrics for the rest of the
session, through the later tests' Ray clusters and their shutdown.
"""

import pytest


@pytest.fixture(autouse=True)
def replicas_are_shut_down(monkeypatch):
    from deployments.model_replica import ModelReplica

    made: list[ModelReplica] = []
    construct = ModelReplica.__init__

    def recorded(self, *args, **kwargs):
        made.append(self)
        construct(self, *args, **kwargs)

    monkeypatch.setattr(ModelReplica, "__init__", recorded)
    yield
    for replica in made:
        replica.shutdown()
