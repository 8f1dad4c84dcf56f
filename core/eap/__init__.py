"""EAP for MHAuth (RFC 6618 §5.9, PROFILE §4 "EAP"): method interfaces, the
MN's peer state machine, and the HAC's authenticator with its back ends."""
