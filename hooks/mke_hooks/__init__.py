"""The plugin contract of mke-plugins (hookspecs, MethodSpec, errors). Depends on pluggy only."""
