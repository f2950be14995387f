"""The decision framework, executed on measurements of the user's model and hardware."""

from slimkit.advisor.device import Device, detect
from slimkit.advisor.framework import CANDIDATES, RULES, Candidate
from slimkit.advisor.search import AdviseSettings, Constraints, advise, pareto

__all__ = ["AdviseSettings", "CANDIDATES", "Candidate", "Constraints", "Device", "RULES", "advise", "detect", "pareto"]
