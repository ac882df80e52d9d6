"""The Workflow Description File (WDF): loading, validation and the validated workflow model.

``load_wdf(path, variables, site)`` returns a :class:`Workflow` or raises
:class:`iosea_wf.errors.WDFError` whose ``problems`` lists every :class:`WDFProblem` of the file.
"""

from .load import load_wdf
from .model import SESSION_PLACEHOLDER, DataMover, Service, Step, StepService, WDFProblem, Workflow
from .schema import SERVICE_TYPES

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
