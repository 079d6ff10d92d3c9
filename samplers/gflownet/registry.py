"""The registry of GFlowNet parametrizations: ``GFlowNetConfig.parametrization`` names → classes.

For the config (which checks a name when it is built) and the parametrizations (which register
themselves with :func:`register`, docs/gflownet.md "Adding a parametrization"). It holds no
class itself, so the config can check names without importing the forms.
"""

from __future__ import annotations

from typing import TypeVar

Form = TypeVar("Form", bound=type)

#: Every form by name, in the order ``"auto"`` tries them.
PARAMETRIZATIONS: dict[str, type] = {}


def register(form: Form) -> Form:
    """Class decorator: make ``form`` the ``GFlowNetConfig.parametrization`` choice
    ``form.name`` (a name already taken, or ``"auto"``, is refused)."""
    if form.name == "auto" or form.name in PARAMETRIZATIONS:
        raise ValueError(f"parametrization name {form.name!r} is taken")
    PARAMETRIZATIONS[form.name] = form
    return form
