"""The format registry (see :mod:`sigmadecomp.formats._registry`): one entry per format.

>>> from sigmadecomp import formats
>>> spec = formats.get("tt")
>>> spec.rank_names, spec.layer.__name__
(('r1', 'r2', 'r3'), 'TTConv')
"""

from sigmadecomp.formats._registry import FormatSpec, format_names, get, register, spec_of

__all__ = ["FormatSpec", "format_names", "get", "register", "spec_of"]
