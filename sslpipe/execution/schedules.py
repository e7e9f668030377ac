"""Scheduled retraining on Azure ML: a JobSchedule (cron trigger) around a pipeline job.

Everything up to the service call is checked offline: the cron expression field by field and
the time zone against Azure ML's list, so that a typo is one clear message before anything is
sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sslpipe.core.config import ConfigError

# (name, lowest, highest) of the five cron fields, in order.
_CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
_RANGE = re.compile(r"^(?:(\*)|(\d+)(?:-(\d+))?)(?:/(\d+))?$")
_SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")


class ScheduleError(ConfigError):
    """A schedule setting is invalid; nothing was sent to Azure ML."""


def _check_part(part: str, name: str, low: int, high: int) -> None:
    match = _RANGE.match(part)
    if match is None:
        raise ScheduleError(f"cron {name} field: {part!r} is not *, N, N-M or one of them /STEP")
    star, first, last, step = match.groups()
    if step is not None and int(step) == 0:
        raise ScheduleError(f"cron {name} field: step 0 in {part!r}")
    if star:
        return
    start, end = int(first), int(last if last is not None else first)
    for value in (start, end):
        if not low <= value <= high:
            raise ScheduleError(f"cron {name} field: {value} is outside {low}-{high}")
    if start > end:
        raise ScheduleError(f"cron {name} field: the range {part!r} runs backwards")


def validate_cron(expression: str) -> str:
    """The expression with single spaces; five fields (minute hour day month weekday).

    Raises:
        ScheduleError: naming the field and the problem.
    """
    fields = expression.split()
    if len(fields) != len(_CRON_FIELDS):
        raise ScheduleError(
            f"cron expression {expression!r} has {len(fields)} fields; expected 5: "
            "minute hour day-of-month month day-of-week, e.g. '0 3 * * 1'"
        )
    for text, (name, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            _check_part(part, name, low, high)
    return " ".join(fields)


def validate_time_zone(time_zone: str) -> str:
    """Azure ML's time zone names (Windows names such as 'W. Europe Standard Time', or UTC)."""
    from azure.ai.ml.constants import TimeZone

    names = {zone.value for zone in TimeZone}
    if time_zone not in names:
        close = sorted(n for n in names if time_zone.lower() in n.lower())[:5]
        hint = f"; did you mean one of {close}?" if close else " (Windows time zone names)"
        raise ScheduleError(f"unknown time zone {time_zone!r} for Azure ML schedules{hint}")
    return time_zone


@dataclass(frozen=True)
class ScheduleRequest:
    """What ``execute.py --schedule`` asks for."""

    name: str
    cron: str
    time_zone: str = "UTC"

    def validated(self) -> ScheduleRequest:
        if not _SCHEDULE_NAME.match(self.name):
            raise ScheduleError(
                f"schedule name {self.name!r}: use letters, digits, '-' and '_' (at most 255)"
            )
        return ScheduleRequest(
            self.name, validate_cron(self.cron), validate_time_zone(self.time_zone)
        )


def build_schedule(job: Any, request: ScheduleRequest, *, pipeline: str) -> Any:
    """An azure-ai-ml ``JobSchedule`` that submits ``job`` on the cron trigger."""
    from azure.ai.ml.entities import CronTrigger, JobSchedule

    checked = request.validated()
    return JobSchedule(
        name=checked.name,
        trigger=CronTrigger(expression=checked.cron, time_zone=checked.time_zone),
        create_job=job,
        description=f"sslpipe: retrain the {pipeline} pipeline on '{checked.cron}'",
        tags={"sslpipe.pipeline": pipeline},
    )


def create_or_update(client: Any, schedule: Any, echo: Callable[[str], None] = print) -> Any:
    created = client.schedules.begin_create_or_update(schedule).result()
    echo(
        f"[sslpipe] schedule {created.name}: '{schedule.trigger.expression}' "
        f"({schedule.trigger.time_zone}), enabled"
    )
    return created


def list_schedules(client: Any) -> list[dict[str, Any]]:
    """Name, cron, time zone and state of every schedule in the workspace."""
    rows = []
    for schedule in client.schedules.list():
        trigger = getattr(schedule, "trigger", None)
        rows.append(
            {
                "name": schedule.name,
                "cron": getattr(trigger, "expression", None),
                "time_zone": str(getattr(trigger, "time_zone", "")),
                "enabled": bool(getattr(schedule, "is_enabled", True)),
            }
        )
    return rows


def disable(client: Any, name: str) -> None:
    client.schedules.begin_disable(name=name).result()


def delete(client: Any, name: str) -> None:
    client.schedules.begin_delete(name=name).result()
