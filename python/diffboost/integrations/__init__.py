"""Integrations with diffusers: each module defines a feature's config, its install/uninstall on a model, and
registers it as a keyword of :func:`diffboost.patch`. Importing this package registers them all."""

from diffboost.integrations import attention  # noqa: F401
from diffboost.integrations import cache  # noqa: F401
from diffboost.integrations import linear_attention  # noqa: F401
from diffboost.integrations import quant  # noqa: F401
