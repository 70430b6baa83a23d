"""Shared base for config sections: unknown keys are errors, never silently ignored."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Field metadata for knobs that decide how a stage runs, never what it writes (worker processes): left out
# of the stage fingerprint, so changing them resumes the same output instead of rebuilding it.
EXECUTION_ONLY = {"fingerprint": False}


def execution_field(default: Any, **kwargs: Any) -> Any:
    return Field(default, json_schema_extra=EXECUTION_ONLY, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The section as JSON data without its execution-only fields."""
        skip = {name for name, f in type(self).model_fields.items() if f.json_schema_extra == EXECUTION_ONLY}
        return self.model_dump(mode="json", exclude=skip)
