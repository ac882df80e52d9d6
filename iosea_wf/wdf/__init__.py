"""The Workflow Description File (WDF): loading, validation and the validated workflow model.

``load_wdf(path, variables, site)`` returns a :class:`Workflow` or raises
:class:`iosea_wf.errors.WDFError` whose ``problems`` lists every :class:`WDFProblem` of the file.
"""

from .model import SESSION_PLACEHOLDER, DataMover, Service, Step, StepService, WDFProblem, Workflow


def __getattr__(name: str):
    # Loading and validating pull in YAML, Jinja's lexer and the compiled schemas (~0.1 s):
    # commands that only rebuild a stored workflow (run, status, access) never pay for them.
    if name == "load_wdf":
        from .load import load_wdf

        return load_wdf
    if name == "SERVICE_TYPES":
        from .schema import SERVICE_TYPES

        return SERVICE_TYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SERVICE_TYPES",
    "SESSION_PLACEHOLDER",
    "DataMover",
    "Service",
    "Step",
    "StepService",
    "WDFProblem",
    "Workflow",
    "load_wdf",
]
