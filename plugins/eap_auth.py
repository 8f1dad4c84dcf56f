"""The ``eap`` authentication method (RFC 6618 §5.9, PROFILE §4 "EAP").

Registered like any third-party plugin; the machinery lives in
``core/eap/`` (the MHAuth layer, the MN's peer state machine and the HAC's
local back end).  EAP methods themselves (EAP-TLS, EAP-AKA...) are separate
plugins on the ``mipsec_eap_methods`` hook; pass-through back ends on
``mipsec_eap_backends``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mipsec.core.authmethod import AuthMethod
from mipsec.core.eap.mhauth import EapMethod
from mipsec.core.hookspecs import hookimpl


@hookimpl
def mipsec_auth_methods() -> Sequence[Any]:
    method: AuthMethod = EapMethod()
    return [method]
