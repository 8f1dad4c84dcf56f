"""AAA interworking (RADIUS pass-through for EAP). Filled by the EAP/RADIUS issue."""
