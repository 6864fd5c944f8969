"""The autoscaling policy of model deployments: interactive requests scale a pool, batch lines use idle time.

Serve counts every ongoing request, and a batch line in flight is one: with its default policy a batch alone
would add replicas. Each ``ModelReplica`` reports the batch lines it holds (``record_autoscaling_stats``:
``background_requests``), and this policy leaves them out unless the deployment's
``autoscaling.batch_backlog_share`` lets a backlog scale it (``serve_app.domain.batches.replicas_wanted``, the
policy in plain Python). Serve wraps any policy with the deployment's bounds, delays and scaling factors.
"""

from __future__ import annotations

from typing import Any

from serve_app.domain.batches import replicas_wanted

BACKGROUND_METRIC = "background_requests"
INTERACTIVE_METRIC = "interactive_requests"
POLICY_PATH = "deployments.autoscaling_policy:InteractiveFirstPolicy"


class InteractiveFirstPolicy:
    """A Serve autoscaling policy (a class: Serve builds it once with ``policy_kwargs``).

    Both counts come from the replicas' own reports, so they are sampled together: subtracting the lines from
    Serve's handle-side request count instead mixed two clocks, and a second's skew at a batch's start read as
    interactive load. Requests still queued at handles (past the replicas' ``max_ongoing_requests``) count as
    interactive. Until every replica has reported, the deployment holds its size.
    """

    def __init__(self, backlog_share: float = 0.0) -> None:
        self.backlog_share = backlog_share

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        reports = ctx.aggregated_metrics or {}
        interactive, background = reports.get(INTERACTIVE_METRIC), reports.get(BACKGROUND_METRIC)
        if not interactive or background is None or len(interactive) < ctx.current_num_replicas:
            return ctx.current_num_replicas, {}
        waiting = ctx.total_queued_requests or 0.0
        return replicas_wanted(ctx.current_num_replicas, sum(interactive.values()) + waiting,
                               sum(background.values()), ctx.config.get_target_ongoing_requests(),
                               ctx.config.max_replicas, self.backlog_share), {}


def autoscaling_options(autoscaling: Any) -> dict[str, Any]:
    """A deployment's ``autoscaling_config``: its config section, with this policy in Serve's default's place."""
    options = autoscaling.model_dump(exclude_none=True)
    share = options.pop("batch_backlog_share", 0.0)
    options["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {"backlog_share": share}}
    return options
