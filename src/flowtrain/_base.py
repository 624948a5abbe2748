"""The base class every config section derives from: strict (unknown keys fail), validated on assignment."""

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator


def text_choices(annotation: Any) -> tuple[str, ...] | None:
    """The choices of a Literal of strings (clip.kind, guard actions), else None."""
    if get_origin(annotation) is Literal and all(isinstance(a, str) for a in get_args(annotation)):
        return get_args(annotation)
    return None


class Section(BaseModel):
    """A config section. Unknown keys are errors, so a typo never silently falls back to a default; a number
    must be finite (optim.lr=.inf would train NaN weights to the end and exit 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans_back_to_words(cls, data: Any) -> Any:
        """YAML reads an unquoted `off` (and `on`) as a boolean; where the field's choices are words that
        include it (clip.kind: off, guard.loss_spike: off), take the word the user wrote."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            choices = text_choices(field.annotation) if field is not None else None
            if choices and isinstance(value, bool):
                word = "on" if value else "off"
                if word in choices:
                    out[name] = word
        return out
