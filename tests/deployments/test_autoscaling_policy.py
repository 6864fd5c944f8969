"""The model deployments' autoscaling policy: batch lines use idle time and add replicas only when allowed."""

from __future__ import annotations

import pytest

from deployments.autoscaling_policy import BACKGROUND_METRIC, INTERACTIVE_METRIC, POLICY_PATH, InteractiveFirstPolicy
from serve_app.domain.batches import replicas_wanted


def test_batch_lines_add_no_replica_unless_a_backlog_share_allows_it():
    # Two replicas, target 1: two interactive requests want two; two batch lines alone keep one.
    assert replicas_wanted(2, interactive=2, background=0, target_per_replica=1, max_replicas=8) == 2
    assert replicas_wanted(2, interactive=0, background=2, target_per_replica=1, max_replicas=8) == 1
    assert replicas_wanted(2, interactive=3, background=2, target_per_replica=1, max_replicas=8) == 3
    assert replicas_wanted(2, interactive=0, background=0, target_per_replica=1, max_replicas=8) == 0
    # A quarter of max_replicas for the backlog: six lines ask for 6 and get 2 (8 x 0.25).
    assert replicas_wanted(1, interactive=0, background=6, target_per_replica=1, max_replicas=8,
                           backlog_share=0.25) == 2
    assert replicas_wanted(1, interactive=0, background=6, target_per_replica=1, max_replicas=2,
                           backlog_share=0.1) == 1
    # Interactive demand above the backlog's cap wins.
    assert replicas_wanted(1, interactive=7, background=2, target_per_replica=1, max_replicas=8,
                           backlog_share=0.25) == 7


def context(current: int, interactive: dict, background: dict, queued: float = 0.0, max_replicas: int = 8):
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(min_replicas=1, max_replicas=max_replicas, target_ongoing_requests=1)
    return AutoscalingContext(
        deployment_id=None, deployment_name="image-z-image-turbo", app_name="imageserve",
        current_num_replicas=current, target_num_replicas=current, running_replicas=list(interactive),
        total_num_requests=sum(interactive.values()) + sum(background.values()) + queued,
        total_queued_requests=queued,
        aggregated_metrics={INTERACTIVE_METRIC: interactive, BACKGROUND_METRIC: background}, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=max_replicas, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config)


def test_the_policy_reads_the_replicas_reports_from_serves_context():
    idle, lines = {"a": 0.0, "b": 0.0}, {"a": 2.0, "b": 0.0}
    assert InteractiveFirstPolicy()(context(2, idle, lines)) == (1.0, {})
    assert InteractiveFirstPolicy(backlog_share=0.5)(context(2, idle, lines)) == (2.0, {})
    assert InteractiveFirstPolicy()(context(2, {"a": 1.0, "b": 1.0}, lines, queued=2.0))[0] == 4.0
    # A replica that has not reported yet: the deployment holds its size rather than guess.
    assert InteractiveFirstPolicy()(context(2, {"a": 0.0}, {"a": 2.0}))[0] == 2


def test_an_autoscaled_deployment_takes_the_policy_serve_can_import(tiny_models):
    from ray.serve.config import AutoscalingConfig

    from deployments.model_replica import ModelReplica
    from serve_app.domain.config import parse_config
    from serve_app.domain.specs import resolve_application

    config = parse_config({"device": {"device": "cpu"}, "models": {"z-image-turbo": {
        "source": str(tiny_models["z-image-turbo"]),
        "deployment": {"autoscaling": {"max_replicas": 4, "batch_backlog_share": 0.5}}}}})
    (spec,) = resolve_application(config).replicas
    options = ModelReplica.serve_options(spec)["autoscaling_config"]
    assert options["policy"] == {"policy_function": POLICY_PATH, "policy_kwargs": {"backlog_share": 0.5}}
    policy = AutoscalingConfig(**options).policy.get_policy()  # Serve serializes it by import, as it deploys
    assert policy.__name__ == "InteractiveFirstPolicy"


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_backlog_share_outside_0_to_1_is_refused_at_load(share):
    from serve_app.domain.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="batch_backlog_share"):
        parse_config({"models": {"z-image-turbo": {"deployment": {"autoscaling": {
            "max_replicas": 2, "batch_backlog_share": share}}}}})
