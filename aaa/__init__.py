"""AAA interworking: RADIUS for the HAC.

* ``codec`` / ``mppe`` / ``dictionary``: sans-I/O RADIUS packets on pyrad
  (RFC 2865, RFC 2866, RFC 3579 EAP-Message and Message-Authenticator,
  RFC 2548 MS-MPPE keys);
* ``radius``: the asyncio client (Identifiers, retransmission, failover,
  dead-server hold-off);
* ``passthrough``: the ``radius`` EAP back end (``mipsec_eap_backends``);
* ``accounting``: the ``radius`` accounting back end (``mipsec_accounting_backends``).

Operator guide: docs-radius.md.
"""
