"""neuro-ood: unsupervised out-of-distribution detection for brain MRI.

Data -> preprocessing -> backbone -> features -> scorer -> metrics -> report; each stage is a
sub-package that only imports from stages before it.
"""

__version__ = "0.1.0"
