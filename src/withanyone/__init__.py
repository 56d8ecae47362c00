"""WithAnyone: identity-consistent generation of one to four given people on FLUX.1.

Subpackages: ``faces`` (detect → align → embed → match), ``bench`` (MultiID-Bench), ``data``
(MultiID-2M builder), ``model`` (identity adapter), ``pipeline`` (generation), ``train``, ``app``.
"""

__version__ = "0.1.0"
